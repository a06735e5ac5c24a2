//! The one template syntax of the configuration: literal text with
//! `{placeholder}`s naming a field of the event. `sink.topic` and
//! `envelope.dataschema` both use it; each allows its own placeholders and
//! renders values its own way (a topic verbatim, a URI percent-encoded).

/// A field of an event a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    /// `{aggregate_type}`
    AggregateType,
    /// `{event_type}`
    EventType,
    /// `{event_version}`
    EventVersion,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::AggregateType => "aggregate_type",
            Field::EventType => "event_type",
            Field::EventVersion => "event_version",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A parsed template: literals and the fields between them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `template`, accepting only the placeholders in `allowed`: an
    /// unclosed brace or any other placeholder is an error that lists them.
    pub(crate) fn parse(template: &str, allowed: &[Field]) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("{template:?} has an unclosed '{{'"))?;
            let name = &rest[open + 1..open + close];
            match allowed.iter().find(|field| field.name() == name) {
                Some(field) => parts.push(Part::Field(*field)),
                None => {
                    return Err(format!("{template:?} uses unknown placeholder {{{name}}}: use {}", choices(allowed)))
                }
            }
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// Appends the rendering to `out`; `value` writes one field's value.
    pub(crate) fn render_into(&self, out: &mut String, mut value: impl FnMut(Field, &mut String)) {
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Field(field) => value(*field, out),
            }
        }
    }
}

/// `{a}, {b} or {c}`: the placeholders a setting accepts, for its errors.
fn choices(allowed: &[Field]) -> String {
    let names: Vec<String> = allowed.iter().map(|f| format!("{{{}}}", f.name())).collect();
    match names.split_last() {
        None => "no placeholders".into(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &[Field] = &[Field::AggregateType, Field::EventType];

    fn render(template: &Template) -> String {
        let mut out = String::new();
        template.render_into(&mut out, |field, out| out.push_str(field.name()));
        out
    }

    #[test]
    fn literals_and_fields_render_in_order() {
        let template = Template::parse("a.{aggregate_type}-{event_type}.z", TOPIC).unwrap();
        assert_eq!(render(&template), "a.aggregate_type-event_type.z");
        assert_eq!(render(&Template::parse("plain", TOPIC).unwrap()), "plain");
        assert_eq!(render(&Template::parse("", TOPIC).unwrap()), "");
    }

    #[test]
    fn unknown_placeholders_and_unclosed_braces_are_named() {
        let err = Template::parse("x.{event_version}", TOPIC).unwrap_err();
        assert!(err.contains("unknown placeholder {event_version}: use {aggregate_type} or {event_type}"), "{err}");
        let all = [Field::EventType, Field::EventVersion, Field::AggregateType];
        let err = Template::parse("{x}", &all).unwrap_err();
        assert!(err.ends_with("use {event_type}, {event_version} or {aggregate_type}"), "{err}");
        assert!(Template::parse("x.{event_type", TOPIC).unwrap_err().contains("unclosed"));
    }
}
