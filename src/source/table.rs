//! The outbox table's name, parsed once and always spliced into SQL quoted.

use std::fmt;

/// A `schema.table` (or bare `table`) name that is safe to put in SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    /// Schema, when given; otherwise the search path decides.
    pub schema: Option<String>,
    /// Table name.
    pub table: String,
}

impl TableName {
    /// Parses `schema.table` or `table`; names must be plain identifiers.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = text.split('.').collect();
        let (schema, table) = match parts.as_slice() {
            [table] => (None, *table),
            [schema, table] => (Some(*schema), *table),
            _ => return Err(format!("\"{text}\" must be `schema.table` or `table`")),
        };
        for part in schema.iter().chain(std::iter::once(&table)) {
            if !crate::config::is_identifier(part) {
                return Err(format!("\"{text}\": \"{part}\" is not a plain identifier (letters, digits, underscore)"));
            }
        }
        Ok(TableName { schema: schema.map(str::to_owned), table: table.to_owned() })
    }
}

/// The table as Postgres resolves it, `schema.table`: relays that spell it
/// differently (with or without the schema) still share one set of lanes.
pub async fn resolve(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<String, crate::postgres::PostgresError> {
    let row = client
        .query_opt(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&table.to_string()],
        )
        .await
        .map_err(|e| crate::postgres::PostgresError::query("resolving the outbox table", &e))?;
    match row {
        Some(row) => {
            row.try_get(0).map_err(|e| crate::postgres::PostgresError::query("resolving the outbox table", &e))
        }
        None => Err(crate::postgres::PostgresError::Query(format!(
            "the outbox table {table} does not exist: run `outbox-relay migrate`, or set source.table to your table"
        ))),
    }
}

/// Double-quotes an identifier for SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl fmt::Display for TableName {
    /// The quoted form, ready for SQL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{}.{}", quote_ident(schema), quote_ident(&self.table)),
            None => write!(f, "{}", quote_ident(&self.table)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_quotes_schema_qualified_names() {
        let t = TableName::parse("outbox.events").unwrap();
        assert_eq!(t.to_string(), "\"outbox\".\"events\"");
        assert_eq!(TableName::parse("events").unwrap().to_string(), "\"events\"");
    }

    #[test]
    fn rejects_injection_and_extra_parts() {
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("events; drop table x").is_err());
        assert!(TableName::parse("").is_err());
    }
}
