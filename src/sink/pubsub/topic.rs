//! Pub/Sub topic names. Kafka accepts names Pub/Sub does not (`1-orders`,
//! `ab`, `goog.x`), so every rendered topic is checked against Pub/Sub's
//! rule before it is sent, and a static `sink.topic` is checked at start-up.
//! Names are never rewritten: a silent mapping would let two Kafka-valid
//! names land on one Pub/Sub topic.

/// Pub/Sub's rule, quoted in every rejection so the operator can fix the name.
pub const TOPIC_RULE: &str = "Pub/Sub topic names are 3-255 characters of A-Z a-z 0-9 - _ . ~ + %, start with a letter, and do not start with \"goog\"";

/// Whether Pub/Sub accepts `name` as a topic id (the part after `topics/`).
pub fn check_topic_name(name: &str) -> Result<(), String> {
    let problem = if name.len() < 3 {
        Some("is shorter than 3 characters")
    } else if name.len() > 255 {
        Some("is longer than 255 characters")
    } else if !name.as_bytes()[0].is_ascii_alphabetic() {
        Some("does not start with a letter")
    } else if name.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("goog")) {
        Some("starts with \"goog\"")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'%')) {
        Some("contains a character outside A-Z a-z 0-9 - _ . ~ + %")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(format!("topic {name:?} {problem} ({TOPIC_RULE})")),
    }
}

/// Checks a `sink.topic` template for Pub/Sub at start-up: the rendering
/// of sample values must be a valid name, which catches bad literal
/// characters, a leading digit or `goog` prefix, and names that are too short.
pub fn check_template(template: &crate::envelope::TopicTemplate) -> Result<(), String> {
    check_topic_name(&template.render("Aggregate", "EventType"))
}

/// Full resource name `projects/{project}/topics/{name}`.
pub fn resource_name(project: &str, name: &str) -> String {
    format!("projects/{project}/topics/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::TopicTemplate;

    #[test]
    fn kafka_style_names_that_pubsub_accepts() {
        for name in ["outbox.Order", "orders", "a-b_c.d~e+f%20", &format!("t{}", "x".repeat(254))] {
            check_topic_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn names_pubsub_rejects_say_which_rule() {
        for (name, why) in [
            ("ab", "shorter than 3"),
            ("1-orders", "start with a letter"),
            ("_orders", "start with a letter"),
            ("goog-orders", "starts with \"goog\""),
            ("GOOGorders", "starts with \"goog\""),
            ("orders events", "character outside"),
            ("orders/x", "character outside"),
            ("ordérs", "character outside"),
        ] {
            let err = check_topic_name(name).unwrap_err();
            assert!(err.contains(why) && err.contains(name) && err.contains(TOPIC_RULE), "{name}: {err}");
        }
        let long = format!("t{}", "x".repeat(255));
        assert!(check_topic_name(&long).unwrap_err().contains("longer than 255"));
    }

    #[test]
    fn templates_are_checked_with_sample_values() {
        check_template(&TopicTemplate::parse("outbox.{aggregate_type}").unwrap()).unwrap();
        check_template(&TopicTemplate::parse("{event_type}").unwrap()).unwrap();
        assert!(check_template(&TopicTemplate::parse("1.{aggregate_type}").unwrap()).is_err());
        assert!(check_template(&TopicTemplate::parse("goog.{aggregate_type}").unwrap()).is_err());
        assert!(check_template(&TopicTemplate::parse("ab").unwrap()).is_err());
    }

    #[test]
    fn resource_name_is_projects_topics() {
        assert_eq!(resource_name("my-proj", "outbox.Order"), "projects/my-proj/topics/outbox.Order");
    }
}
