//! Arrow layouts derived from the JSON Schema of a record type.
//!
//! The JSON Schema is generated from the serde type by `schemars`; this module turns it into
//! a flat list of columns. Nested objects with declared properties (the event's
//! `attributes`) are flattened into top-level columns so that SQL and BI tools see plain
//! columns; free-form objects (`properties`) become JSON text columns. Because the layout is
//! computed from the type, adding a field to the type adds the column — nothing is listed
//! twice.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, TimeUnit};
use schemars::JsonSchema;
use serde_json::Value;

/// One column of a flattened record.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Column name (the last path segment).
    pub name: String,
    /// Where the value sits in the record's serde JSON form.
    pub path: Vec<String>,
    pub data_type: DataType,
    pub nullable: bool,
    /// The value is an arbitrary JSON object stored as its text.
    pub json_text: bool,
}

/// The columns of one record type, in declaration order.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub columns: Vec<Column>,
}

impl Layout {
    /// Derives the layout of `T` from its JSON Schema.
    ///
    /// Panics only if `T`'s schema uses a construct this module does not map, which a
    /// unit test for every record type catches at build time.
    pub fn of<T: JsonSchema>() -> Self {
        let root = schemars::schema_for!(T).to_value();
        let mut columns = Vec::new();
        walk(&root, &root, &[], false, &mut columns)
            .unwrap_or_else(|e| panic!("cannot derive an Arrow layout: {e}"));
        Layout { columns }
    }

    pub fn arrow_schema(&self) -> Schema {
        Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.clone(), c.nullable))
                .collect::<Vec<_>>(),
        )
    }

    /// The schema without the named columns (used for files whose directory path carries
    /// those values, e.g. `tenant_id=`).
    pub fn arrow_schema_without(&self, excluded: &[&str]) -> Schema {
        Schema::new(
            self.columns
                .iter()
                .filter(|c| !excluded.contains(&c.name.as_str()))
                .map(|c| Field::new(&c.name, c.data_type.clone(), c.nullable))
                .collect::<Vec<_>>(),
        )
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

fn walk(
    root: &Value,
    schema: &Value,
    path: &[String],
    parent_nullable: bool,
    out: &mut Vec<Column>,
) -> Result<(), String> {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return Err(format!("object at {path:?} has no properties"));
    };
    for (name, prop) in props {
        let (resolved, nullable) = resolve(root, prop)?;
        let nullable = nullable || parent_nullable;
        let mut child_path = path.to_vec();
        child_path.push(name.clone());
        if is_type(resolved, "object") {
            if resolved.get("properties").is_some() {
                walk(root, resolved, &child_path, nullable, out)?;
            } else {
                out.push(Column {
                    name: name.clone(),
                    path: child_path,
                    data_type: DataType::Utf8,
                    nullable,
                    json_text: true,
                });
            }
            continue;
        }
        let data_type = scalar_type(root, resolved)
            .map_err(|e| format!("field {}: {e}", child_path.join(".")))?;
        out.push(Column {
            name: name.clone(),
            path: child_path,
            data_type,
            nullable,
            json_text: false,
        });
    }
    Ok(())
}

/// Follows `$ref`s and strips `null` alternatives, reporting whether null was allowed.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> Result<(&'a Value, bool), String> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/$defs/")
            .ok_or_else(|| format!("unsupported reference {reference}"))?;
        let target = root
            .get("$defs")
            .and_then(|d| d.get(name))
            .ok_or_else(|| format!("dangling reference {reference}"))?;
        return resolve(root, target);
    }
    for combinator in ["anyOf", "oneOf"] {
        if let Some(alternatives) = schema.get(combinator).and_then(Value::as_array) {
            let non_null: Vec<&Value> = alternatives
                .iter()
                .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                .collect();
            let nullable = non_null.len() != alternatives.len();
            if non_null.len() != 1 {
                return Err(format!("{combinator} with {} alternatives", non_null.len()));
            }
            let (inner, inner_nullable) = resolve(root, non_null[0])?;
            return Ok((inner, nullable || inner_nullable));
        }
    }
    let nullable = match schema.get("type") {
        Some(Value::Array(types)) => types.iter().any(|t| t == "null"),
        _ => false,
    };
    Ok((schema, nullable))
}

fn types_of(schema: &Value) -> Vec<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect(),
        _ => Vec::new(),
    }
}

fn is_type(schema: &Value, wanted: &str) -> bool {
    types_of(schema) == [wanted]
}

fn scalar_type(root: &Value, schema: &Value) -> Result<DataType, String> {
    let format = schema.get("format").and_then(Value::as_str);
    if format == Some("date-time") {
        return Ok(DataType::Timestamp(
            TimeUnit::Millisecond,
            Some("UTC".into()),
        ));
    }
    let types = types_of(schema);
    match types.as_slice() {
        ["string"] => Ok(DataType::Utf8),
        ["boolean"] => Ok(DataType::Boolean),
        ["number"] => Ok(DataType::Float64),
        ["integer"] => Ok(match format {
            Some("uint8") => DataType::UInt8,
            Some("uint16") => DataType::UInt16,
            Some("uint32") => DataType::UInt32,
            Some("uint64") | Some("uint") => DataType::UInt64,
            Some("int32") => DataType::Int32,
            _ => DataType::Int64,
        }),
        ["array"] => {
            let items = schema
                .get("items")
                .ok_or_else(|| "array without items".to_string())?;
            let (items, _) = resolve(root, items)?;
            let inner = scalar_type(root, items)?;
            Ok(DataType::List(Arc::new(Field::new("item", inner, true))))
        }
        other => Err(format!("unsupported JSON Schema type {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ActivityEvent;
    use crate::records::{DeadLetter, FeatureRow};

    #[test]
    fn event_layout_flattens_attributes_and_keeps_properties_as_text() {
        let layout = Layout::of::<ActivityEvent>();
        let names: Vec<&str> = layout.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "schema_version",
                "event_id",
                "tenant_id",
                "user_id",
                "source",
                "kind",
                "timestamp",
                "received_at",
                "duration_ms",
                "app",
                "title",
                "url",
                "project",
                "language",
                "branch",
                "file",
                "participants",
                "status",
                "properties"
            ]
        );
        let col = |n: &str| layout.column(n).unwrap().clone();
        assert_eq!(col("schema_version").data_type, DataType::UInt16);
        assert_eq!(
            col("timestamp").data_type,
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
        );
        assert!(!col("timestamp").nullable);
        assert!(col("received_at").nullable);
        assert_eq!(col("duration_ms").data_type, DataType::UInt64);
        assert_eq!(col("app").path, ["attributes", "app"]);
        assert!(col("app").nullable);
        assert!(matches!(col("participants").data_type, DataType::List(_)));
        assert!(col("properties").json_text);
        assert!(col("event_id").nullable);
    }

    #[test]
    fn derived_records_have_layouts() {
        let f = Layout::of::<FeatureRow>();
        assert_eq!(f.column("value").unwrap().data_type, DataType::Float64);
        assert_eq!(f.column("is_final").unwrap().data_type, DataType::Boolean);
        assert_eq!(f.column("granularity").unwrap().data_type, DataType::Utf8);
        let d = Layout::of::<DeadLetter>();
        assert!(d.column("event_id").unwrap().nullable);
        assert!(!d.column("reason").unwrap().nullable);
    }
}
