//! Agents describe what they can do (docs/design.md, "Discovery"): the
//! macro's description, published with the mailbox, read back over gRPC.

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_proto::pb;
use academy_sdk::schemars::JsonSchema;
use academy_sdk::{Behaviour as _, Manager, behaviour};
use serde::{Deserialize, Serialize};

/// A point, described precisely.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "academy_sdk::schemars")]
struct Point {
    x: f64,
    y: f64,
}

/// A type without a schema: described as any value.
#[derive(Debug, Serialize, Deserialize)]
struct Opaque {
    blob: String,
}

#[derive(Default)]
struct Plotter {}

/// Plots points.
///
/// On a plane.
#[behaviour(name = "test.Plotter")]
impl Plotter {
    /// Moves a point by `dx`.
    #[action]
    async fn shift(&self, point: Point, dx: f64) -> Point {
        Point { x: point.x + dx, y: point.y }
    }

    #[action(read_only)]
    async fn opaque(&self, thing: Opaque) -> Result<u64, String> {
        Ok(thing.blob.len() as u64)
    }
}

fn json(value: Option<&academy_proto::prost_types::Value>) -> serde_json::Value {
    academy_proto::json::from_proto(value.cloned().unwrap_or_default())
}

#[test]
fn the_macro_describes_docs_parameters_and_schemas() {
    let described = Plotter::describe();
    assert_eq!(described.doc, "Plots points.\n\nOn a plane.");
    let [shift, opaque] = &described.actions[..] else { panic!("{described:?}") };
    assert_eq!((shift.name.as_str(), shift.doc.as_str()), ("shift", "Moves a point by `dx`."));
    assert_eq!(shift.params, ["point", "dx"]);
    assert!(!shift.read_only && opaque.read_only);
    let input = json(shift.input_schema.as_ref());
    assert_eq!(input["type"], "object");
    assert_eq!(input["required"], serde_json::json!(["point", "dx"]));
    assert_eq!(input["properties"]["dx"]["type"], "number");
    // The custom type by reference, its definition alongside.
    assert_eq!(input["properties"]["point"]["$ref"], "#/$defs/Point");
    assert_eq!(input["$defs"]["Point"]["required"], serde_json::json!(["x", "y"]));
    let output = json(shift.output_schema.as_ref());
    assert_eq!(output["$ref"], "#/$defs/Point");
    assert!(output["$defs"]["Point"].is_object());
    // Without a schema: any value; a Result's Ok type is the result.
    let input = json(opaque.input_schema.as_ref());
    assert_eq!(input["properties"]["thing"], serde_json::json!({}));
    assert_eq!(json(opaque.output_schema.as_ref())["type"], "integer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_agent_is_described_by_the_exchange() {
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let manager = Manager::connect(&server.url()).await.unwrap();
    let plotter = manager.launch(Plotter::default()).await.unwrap();
    let mut rpc =
        pb::exchange_service_client::ExchangeServiceClient::connect(server.url()).await.unwrap();
    let request = pb::DescribeRequest { agent_id: plotter.id().to_string() };
    let agent = rpc.describe(request).await.unwrap().into_inner().agent.unwrap();
    assert_eq!(agent.behaviour, "test.Plotter");
    assert_eq!(agent.description, Some(Plotter::describe()));
    manager.close().await.unwrap();
}
