//! OpenAI's `response_format` to the [`Shape`] constrained decoding holds an answer to: `text`
//! (free), `json_object` (any object), and `json_schema` with the subset of JSON Schema that
//! a grammar can enforce exactly. Every keyword outside it is refused by name, never ignored:
//! an answer that only looked checked would mislead.

use mycel_core::grammar::Shape;
use serde_json::Value;

/// Keywords that describe and constrain nothing.
const ANNOTATIONS: [&str; 7] = [
    "title",
    "description",
    "$schema",
    "$comment",
    "examples",
    "default",
    "strict",
];

/// The shape `response_format` asks for: `None` for free text. The error names what is
/// wrong, for a 400.
pub fn response_format(format: &Value) -> Result<Option<Shape>, String> {
    if format.is_null() {
        return Ok(None);
    }
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Shape::AnyObject)),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .ok_or("json_schema needs a schema (response_format.json_schema.schema)")?;
            let shape = shape(schema, "schema")?;
            shape.check()?;
            Ok(Some(shape))
        }
        Some(other) => Err(format!(
            "type {other:?} is not one of text, json_object, json_schema"
        )),
        None => Err("response_format needs a type (text, json_object or json_schema)".into()),
    }
}

/// The shape of `schema`, found at `at` (for messages).
fn shape(schema: &Value, at: &str) -> Result<Shape, String> {
    let Value::Object(fields) = schema else {
        return match schema {
            Value::Bool(true) => Ok(Shape::Any),
            _ => Err(format!("{at} is not a schema object")),
        };
    };
    for key in fields.keys() {
        let known = ANNOTATIONS.contains(&key.as_str())
            || matches!(
                key.as_str(),
                "type"
                    | "properties"
                    | "required"
                    | "additionalProperties"
                    | "items"
                    | "enum"
                    | "const"
            );
        if !known {
            return Err(format!(
                "{at}: keyword {key:?} is not supported (type, properties, required, items, \
                 enum, const and additionalProperties: false are)"
            ));
        }
    }
    let values: Option<Vec<&Value>> = match (fields.get("enum"), fields.get("const")) {
        (None, None) => None,
        (Some(Value::Array(values)), None) => Some(values.iter().collect()),
        (None, Some(value)) => Some(vec![value]),
        _ => return Err(format!("{at}: enum must be a list, and not beside const")),
    };
    if let Some(values) = values {
        // A type beside them must be theirs: it is not checked apart.
        if let Some(kind) = fields.get("type") {
            let fits = |v: &Value| match kind.as_str() {
                Some("string") => v.is_string(),
                Some("number") => v.is_number(),
                Some("integer") => v.is_i64() || v.is_u64(),
                Some("boolean") => v.is_boolean(),
                Some("null") => v.is_null(),
                Some("object") => v.is_object(),
                Some("array") => v.is_array(),
                _ => false,
            };
            if let Some(odd) = values.iter().find(|v| !fits(v)) {
                return Err(format!("{at}: enum value {odd} is not of type {kind}"));
            }
        }
        return Ok(Shape::OneOf(values.iter().map(|v| v.to_string()).collect()));
    }
    let kind = match fields.get("type") {
        None if fields.contains_key("properties") => "object",
        None if fields.contains_key("items") => "array",
        None => return Ok(Shape::Any),
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => {
            return Err(format!(
                "{at}: type must be one name (a list of types is not supported)"
            ))
        }
    };
    match kind {
        "object" => object(fields, at),
        "array" => match fields.get("items") {
            None => Ok(Shape::Array(Box::new(Shape::Any))),
            Some(items) => Ok(Shape::Array(Box::new(shape(
                items,
                &format!("{at}.items"),
            )?))),
        },
        "string" => Ok(Shape::String),
        "number" => Ok(Shape::Number),
        "integer" => Ok(Shape::Integer),
        "boolean" => Ok(Shape::Boolean),
        "null" => Ok(Shape::Null),
        other => Err(format!("{at}: type {other:?} is not a JSON Schema type")),
    }
}

/// An object schema: its properties in the order `required` lists them (the order clients
/// such as the openai package's write their fields in), then the others by name.
fn object(fields: &serde_json::Map<String, Value>, at: &str) -> Result<Shape, String> {
    let closed = match fields.get("additionalProperties") {
        None | Some(Value::Bool(true)) => false,
        Some(Value::Bool(false)) => true,
        Some(_) => {
            return Err(format!(
                "{at}: additionalProperties with a schema (a map) is not supported; name the \
                 properties, with additionalProperties false"
            ))
        }
    };
    let Some(properties) = fields.get("properties") else {
        if fields
            .get("required")
            .is_some_and(|r| r != &Value::Array(vec![]))
        {
            return Err(format!(
                "{at}: required names properties it does not describe"
            ));
        }
        return Ok(match closed {
            true => Shape::Object(Vec::new()),
            false => Shape::AnyObject,
        });
    };
    // Open or closed, the answer has exactly the properties named (an object the schema
    // describes either way), every one of them, optional ones too.
    let Value::Object(properties) = properties else {
        return Err(format!("{at}.properties is not an object"));
    };
    let required: Vec<&str> = match fields.get("required") {
        None => Vec::new(),
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        Some(_) => return Err(format!("{at}.required is not a list of names")),
    };
    if let Some(missing) = required.iter().find(|n| !properties.contains_key(**n)) {
        return Err(format!(
            "{at}.required names {missing:?}, which is not a property"
        ));
    }
    let mut names: Vec<&str> = Vec::with_capacity(properties.len());
    for name in required
        .iter()
        .copied()
        .chain(properties.keys().map(String::as_str))
    {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let value = shape(&properties[name], &format!("{at}.properties.{name}"))?;
            Ok((name.to_owned(), value))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Shape::Object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_become_shapes_and_what_cannot_be_enforced_is_named() {
        let format = json!({ "type": "json_schema", "json_schema": { "name": "p", "strict": true,
            "schema": { "type": "object", "additionalProperties": false,
                "required": ["name", "age", "tags", "mood"],
                "properties": {
                    "tags": { "type": "array", "items": { "type": "string" } },
                    "age": { "type": "integer", "description": "years" },
                    "name": { "type": "string" },
                    "mood": { "enum": ["calm", 1, null] },
                    "extra": { "const": { "a": [1] } }
                } } } });
        let shape = response_format(&format).unwrap().unwrap();
        assert_eq!(
            shape,
            Shape::Object(vec![
                ("name".into(), Shape::String),
                ("age".into(), Shape::Integer),
                ("tags".into(), Shape::Array(Box::new(Shape::String))),
                (
                    "mood".into(),
                    Shape::OneOf(vec!["\"calm\"".into(), "1".into(), "null".into()])
                ),
                ("extra".into(), Shape::OneOf(vec!["{\"a\":[1]}".into()])),
            ])
        );
        assert_eq!(
            response_format(&json!({ "type": "json_object" })).unwrap(),
            Some(Shape::AnyObject)
        );
        assert_eq!(response_format(&json!({ "type": "text" })).unwrap(), None);
        let closed = schema(json!({ "type": "object", "additionalProperties": false }));
        assert_eq!(
            response_format(&closed).unwrap(),
            Some(Shape::Object(vec![]))
        );
        for (bad, names) in [
            (json!({ "type": "json_schema" }), "schema"),
            (json!({ "type": "xml" }), "xml"),
            (json!({}), "type"),
            (
                schema(json!({ "type": "string", "pattern": "a+" })),
                "pattern",
            ),
            (schema(json!({ "anyOf": [] })), "anyOf"),
            (schema(json!({ "$ref": "#/x" })), "$ref"),
            (
                schema(json!({ "type": ["string", "null"] })),
                "list of types",
            ),
            (schema(json!({ "type": "date" })), "date"),
            (
                schema(json!({ "type": "object", "properties": { "a": { "minimum": 1 } } })),
                "minimum",
            ),
            (
                schema(json!({ "type": "object", "required": ["b"], "properties": {} })),
                "\"b\"",
            ),
            (schema(json!(7)), "not a schema"),
            (
                schema(json!({ "type": "object", "additionalProperties": { "type": "integer" } })),
                "a map",
            ),
            (
                schema(json!({ "type": "object", "required": ["a"] })),
                "required",
            ),
            (
                schema(json!({ "type": "string", "enum": ["a", 1] })),
                "not of type",
            ),
        ] {
            let refused = response_format(&bad).unwrap_err();
            assert!(refused.contains(names), "{bad}: {refused}");
        }
    }

    fn schema(schema: Value) -> Value {
        json!({ "type": "json_schema", "json_schema": { "name": "s", "schema": schema } })
    }
}
