//! What an agent can do, for those who call it (docs/design.md,
//! "Discovery"): the `#[behaviour]` macro describes each action (its doc
//! comment, parameter names, and the JSON Schemas of its arguments and
//! result) and the runtime publishes it with the agent's mailbox.
//!
//! A type's schema comes from its [`schemars::JsonSchema`] implementation
//! (derive it on your own types); a type without one is described as any
//! JSON value, so no action needs one to be described.

use std::marker::PhantomData;

use academy_proto::pb;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Value, json};

/// Stands for type `T` while its schema is looked up.
#[derive(Debug)]
pub struct Probe<T: ?Sized>(PhantomData<T>);

impl<T: ?Sized> Probe<T> {
    /// A probe for `T`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

/// The schema of a type that has one. Called as `(&Probe::<T>::new()).schema(g)`,
/// this is chosen when `T: JsonSchema`, [`Untyped`] otherwise.
pub trait Typed {
    /// `T`'s schema, its definitions left in `generator`.
    fn schema(&self, generator: &mut SchemaGenerator) -> Value;
}

impl<T: ?Sized + JsonSchema> Typed for Probe<T> {
    fn schema(&self, generator: &mut SchemaGenerator) -> Value {
        generator.subschema_for::<T>().to_value()
    }
}

/// Any JSON value: the schema of a type without one.
pub trait Untyped {
    /// `{}`: any value.
    fn schema(&self, generator: &mut SchemaGenerator) -> Value;
}

impl<T: ?Sized> Untyped for &Probe<T> {
    fn schema(&self, _: &mut SchemaGenerator) -> Value {
        json!({})
    }
}

/// One action, as the macro saw it.
#[derive(Debug)]
pub struct ActionDoc {
    /// Its name.
    pub name: &'static str,
    /// Its doc comment.
    pub doc: &'static str,
    /// Its parameters' names, in order.
    pub params: &'static [&'static str],
    /// Whether it is `#[action(read_only)]`.
    pub read_only: bool,
    /// The schemas of its parameters and of its result, made with one
    /// generator, whose definitions they may refer to.
    pub schemas: fn(&mut SchemaGenerator) -> (Vec<Value>, Value),
}

/// A behaviour's description, from its doc comment and its actions.
pub fn describe(doc: &str, actions: &[ActionDoc]) -> pb::AgentDescription {
    pb::AgentDescription { doc: doc.to_owned(), actions: actions.iter().map(action).collect() }
}

fn action(doc: &ActionDoc) -> pb::ActionDescription {
    let mut generator = SchemaGenerator::default();
    let (params, result) = (doc.schemas)(&mut generator);
    let definitions = generator.take_definitions(true);
    let with_definitions = |mut schema: Value| {
        if let (Some(object), false) = (schema.as_object_mut(), definitions.is_empty()) {
            object.insert("$defs".into(), Value::Object(definitions.clone()));
        }
        schema
    };
    let properties: serde_json::Map<String, Value> =
        doc.params.iter().map(|p| (*p).to_owned()).zip(params).collect();
    let input = json!({
        "type": "object",
        "properties": properties,
        "required": doc.params,
        "additionalProperties": false,
    });
    pb::ActionDescription {
        name: doc.name.to_owned(),
        doc: doc.doc.to_owned(),
        params: doc.params.iter().map(|p| (*p).to_owned()).collect(),
        input_schema: Some(academy_proto::json::to_proto(with_definitions(input))),
        output_schema: Some(academy_proto::json::to_proto(with_definitions(result))),
        read_only: doc.read_only,
    }
}
