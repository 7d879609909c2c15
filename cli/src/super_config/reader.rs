//! A small reader over a parsed TOML table that tracks the dotted path of every value, reports
//! errors with that path, and warns about keys nobody asked for.
//!
//! The super-config is read by hand rather than with `#[derive(Deserialize)]` because its upstream
//! shape relies on untagged enums (whose only error is "did not match any variant") and silently
//! ignores unknown keys; here every error names the offending key and what was expected, and
//! every ignored key produces a warning.

use std::collections::BTreeSet;

use toml::Value;

use crate::warnings::Warnings;

/// A validation error at a place in the super-config.
#[derive(Debug, thiserror::Error)]
#[error("{location}{message}")]
pub struct SchemaError {
    /// `"<dotted.path>: "`, or empty for errors about the whole file.
    location: String,
    message: String,
}

impl SchemaError {
    pub fn new(path: &str, message: impl Into<String>) -> Self {
        let location = if path.is_empty() {
            String::new()
        } else {
            format!("{path}: ")
        };
        SchemaError {
            location,
            message: message.into(),
        }
    }
}

/// Appends `key` to a dotted path, quoting it when it is not a bare TOML key.
pub fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_owned()
    } else {
        serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""))
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// One value of the super-config, with its path.
pub struct Field<'a> {
    pub path: String,
    pub value: &'a Value,
    secret: bool,
}

impl<'a> Field<'a> {
    pub fn new(path: String, value: &'a Value) -> Self {
        Field {
            path,
            value,
            secret: false,
        }
    }

    /// Marks the value as secret: error messages never quote it.
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }

    pub fn err(&self, message: impl Into<String>) -> SchemaError {
        SchemaError::new(&self.path, message)
    }

    /// Describes the value the way serde does in "invalid type" messages.
    fn unexpected(&self) -> String {
        if self.secret {
            return type_name(self.value).to_owned();
        }
        match self.value {
            Value::String(s) => format!("string {s:?}"),
            Value::Integer(i) => format!("integer `{i}`"),
            Value::Float(f) => format!("floating point `{f}`"),
            Value::Boolean(b) => format!("boolean `{b}`"),
            other => type_name(other).to_owned(),
        }
    }

    pub fn invalid_type(&self, expected: &str) -> SchemaError {
        self.err(format!(
            "invalid type: {}, expected {expected}",
            self.unexpected()
        ))
    }

    pub fn string(&self) -> Result<&'a str, SchemaError> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.invalid_type("a string")),
        }
    }

    pub fn owned_string(&self) -> Result<String, SchemaError> {
        self.string().map(str::to_owned)
    }

    pub fn boolean(&self) -> Result<bool, SchemaError> {
        match self.value {
            Value::Boolean(b) => Ok(*b),
            _ => Err(self.invalid_type("a boolean")),
        }
    }

    /// An integer converted to `T`; `expected` names `T` the way serde does (`u32`, `u64`, ...).
    pub fn integer<T: TryFrom<i64>>(&self, expected: &str) -> Result<T, SchemaError> {
        match self.value {
            Value::Integer(i) => T::try_from(*i).map_err(|_| {
                self.err(format!("invalid value: integer `{i}`, expected {expected}"))
            }),
            _ => Err(self.invalid_type(expected)),
        }
    }

    pub fn table(&self) -> Result<Table<'a>, SchemaError> {
        match self.value {
            Value::Table(t) => Ok(Table::new(self.path.clone(), t)),
            _ => Err(self.invalid_type("a table")),
        }
    }

    /// The elements of an array, each with its own path (`key[0]`, `key[1]`, ...).
    pub fn array(&self) -> Result<Vec<Field<'a>>, SchemaError> {
        match self.value {
            Value::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| Field {
                    path: format!("{}[{i}]", self.path),
                    value: v,
                    secret: self.secret,
                })
                .collect()),
            _ => Err(self.invalid_type("an array")),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Integer(_) => "integer",
        Value::Float(_) => "floating point",
        Value::Boolean(_) => "boolean",
        Value::Datetime(_) => "datetime",
        Value::Array(_) => "sequence",
        Value::Table(_) => "map",
    }
}

/// A table of the super-config whose keys are consumed one by one.
pub struct Table<'a> {
    path: String,
    table: &'a toml::Table,
    used: BTreeSet<&'a str>,
}

impl<'a> Table<'a> {
    pub fn new(path: String, table: &'a toml::Table) -> Self {
        Table {
            path,
            table,
            used: BTreeSet::new(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn err(&self, message: impl Into<String>) -> SchemaError {
        SchemaError::new(&self.path, message)
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The value of `key`, if present; the key counts as known either way.
    pub fn opt(&mut self, key: &str) -> Option<Field<'a>> {
        let (k, v) = self.table.get_key_value(key)?;
        self.used.insert(k.as_str());
        Some(Field::new(join(&self.path, key), v))
    }

    /// The value of `key`, which must be present.
    pub fn req(&mut self, key: &str) -> Result<Field<'a>, SchemaError> {
        self.opt(key)
            .ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    /// Every entry, for tables that are maps (arbitrary keys).
    pub fn entries(&mut self) -> Vec<(&'a str, Field<'a>)> {
        let path = self.path.clone();
        self.table
            .iter()
            .map(|(k, v)| {
                self.used.insert(k.as_str());
                (k.as_str(), Field::new(join(&path, k), v))
            })
            .collect()
    }

    /// Accepts `key` without using it, with a warning saying why it has no effect.
    pub fn ignore(&mut self, key: &str, reason: &str, warnings: &mut Warnings) {
        if let Some(field) = self.opt(key) {
            warnings.push(format!("`{}` is ignored: {reason}", field.path));
        }
    }

    /// Warns about every key that was never asked for.
    pub fn finish(self, warnings: &mut Warnings) {
        for key in self.table.keys() {
            if !self.used.contains(key.as_str()) {
                warnings.push(format!(
                    "unknown key `{}` is ignored (aziotctl does not use it; another product \
                     sharing this file may)",
                    join(&self.path, key)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_quotes_non_bare_keys() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a", "b-c_d"), "a.b-c_d");
        assert_eq!(join("a", "b.c"), "a.\"b.c\"");
        assert_eq!(join("a", ""), "a.\"\"");
    }

    #[test]
    fn secret_values_are_never_quoted() {
        let v = Value::Integer(1234);
        let f = Field::new("pin".into(), &v).secret();
        let msg = f.invalid_type("a string").to_string();
        assert_eq!(msg, "pin: invalid type: integer, expected a string");
        let v = Value::String("hunter2".into());
        let f = Field::new("pw".into(), &v).secret();
        assert!(!f
            .integer::<u32>("u32")
            .unwrap_err()
            .to_string()
            .contains("hunter2"));
    }
}
