//! A short run of every fuzz target (the long one is `make fuzz`).

#[test]
fn every_target_survives_a_short_run() {
    for target in academy_fuzz::TARGETS {
        if let Some(input) = academy_fuzz::run(target, 20_000, 0x5eed) {
            panic!("{} panicked on {input:02x?}", target.name);
        }
    }
}

#[test]
fn a_target_that_panics_is_caught_with_its_input() {
    let target = academy_fuzz::Target {
        name: "panics on 0x42",
        run: |data| assert!(!data.contains(&0x42)),
        seeds: || vec![vec![1, 2, 3]],
    };
    let input = academy_fuzz::run(&target, 100_000, 7).expect("the panic is found");
    assert!(input.contains(&0x42));
}
