//! `academy-fuzz [--cases N] [--seed S] [TARGET...]`: runs every fuzz target
//! (or those named) for N cases (10⁶ by default); prints cases run, their
//! rate, and any input that panicked (hex), exiting 1 if one did.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cases, mut seed, mut only) = (1_000_000u64, 0x5eed_u64, Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cases" => cases = args.next().and_then(|n| n.parse().ok()).expect("--cases N"),
            "--seed" => seed = args.next().and_then(|n| n.parse().ok()).expect("--seed S"),
            name => only.push(name.to_owned()),
        }
    }
    std::panic::set_hook(Box::new(|_| {}));
    let mut crashed = false;
    for target in academy_fuzz::TARGETS {
        if !only.is_empty() && !only.iter().any(|n| n == target.name) {
            continue;
        }
        let started = Instant::now();
        let crash = academy_fuzz::run(target, cases, seed);
        let took = started.elapsed().as_secs_f64();
        match crash {
            None => println!(
                "{:<18} {cases} cases, no crash ({:.0} cases/s)",
                target.name,
                cases as f64 / took
            ),
            Some(input) => {
                crashed = true;
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                println!("{:<18} CRASH on input {hex}", target.name);
            }
        }
    }
    std::process::exit(i32::from(crashed));
}
