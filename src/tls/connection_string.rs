//! Connection strings: libpq's URL and key=value forms, split into what
//! tokio-postgres can parse and the TLS parameters it rejects.
//!
//! Hand-written on purpose: libpq URLs are not WHATWG URLs (several hosts
//! in one authority, `host=` in the query, a `?` inside a password before
//! the `@`), so a general URL crate would reject or rewrite valid inputs.
//! The splitter only finds the query and cuts `key=value` pairs; the
//! percent-decoding itself is the `percent-encoding` crate's. Errors never
//! quote the input, which may hold a password.

/// The TLS parameters taken out of a connection string (raw values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlTls {
    /// `sslmode`.
    pub sslmode: Option<String>,
    /// `sslrootcert`: a PEM file, or `system`.
    pub sslrootcert: Option<String>,
    /// `sslcert`: the client certificate (PEM).
    pub sslcert: Option<String>,
    /// `sslkey`: the client certificate's private key (PEM).
    pub sslkey: Option<String>,
    /// `sslpassword` was given (its value is dropped: rustls cannot decrypt keys).
    pub sslpassword: bool,
}

impl UrlTls {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "sslpassword" => {
                self.sslpassword = true;
                return true;
            }
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits a libpq connection string (URL or key=value) into the string
/// tokio-postgres can parse and the TLS parameters it cannot. Other
/// parameters are kept verbatim. The error never quotes the input (it may
/// hold a password).
pub fn split_connection_string(input: &str) -> Result<(String, UrlTls), String> {
    if input.starts_with("postgres://") || input.starts_with("postgresql://") {
        split_url(input)
    } else {
        split_key_values(input)
    }
}

fn split_url(input: &str) -> Result<(String, UrlTls), String> {
    let scheme_end = input.find("://").map(|i| i + 3).unwrap_or(0);
    // Credentials end at an '@' before the first '/' (as libpq reads it), so
    // a '?' in a password is not the start of the query.
    let authority_end = input[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(input.len());
    let after_credentials =
        input[scheme_end..authority_end].rfind('@').map(|i| i + scheme_end + 1).unwrap_or(scheme_end);
    let Some(query_start) = input[after_credentials..].find('?').map(|i| i + after_credentials) else {
        return Ok((input.to_owned(), UrlTls::default()));
    };
    let mut tls = UrlTls::default();
    let mut kept = Vec::new();
    for pair in input[query_start + 1..].split('&') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        if !tls.take(&key, percent_decode(value)?) {
            kept.push(pair);
        }
    }
    let base = &input[..query_start];
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((rest, tls))
}

/// Percent-decodes one query parameter. The `percent-encoding` crate passes
/// a malformed escape (`%zz`, a trailing `%`) through unchanged; libpq
/// refuses it, and so do we, so only the check for that is ours.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let malformed = bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' && !bytes.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)));
    if malformed {
        return Err("has an invalid percent-encoding in its parameters".into());
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "has a parameter that is not UTF-8 after percent-decoding".to_owned())
}

/// libpq key=value syntax: `key = value`, values optionally in single
/// quotes, backslash escapes.
fn split_key_values(input: &str) -> Result<(String, UrlTls), String> {
    let bytes = input.as_bytes();
    let mut tls = UrlTls::default();
    let mut kept: Vec<&str> = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &input[start..i];
        i = skip_space(i);
        if i >= bytes.len() || bytes[i] != b'=' || key.is_empty() {
            return Err("is not a valid connection string (expected key=value pairs)".into());
        }
        i = skip_space(i + 1);
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err("has an unterminated quoted value".into()),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| "has a value that is not UTF-8".to_owned())?;
        if !tls.take(key, value) {
            kept.push(&input[start..i]);
        }
    }
    Ok((kept.join(" "), tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, UrlTls) {
        split_connection_string(s).unwrap()
    }

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = split(
            "postgres://relay:s3cret@db.internal:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5&sslcert=/c.pem&sslkey=/k.pem&sslpassword=pw",
        );
        assert_eq!(rest, "postgres://relay:s3cret@db.internal:5432/app?application_name=x&connect_timeout=5");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(tls.sslcert.as_deref(), Some("/c.pem"));
        assert_eq!(tls.sslkey.as_deref(), Some("/k.pem"));
        assert!(tls.sslpassword);
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn url_without_query_or_tls_is_unchanged() {
        for url in ["postgres://a@b/c", "postgresql://a@b:1/c?connect_timeout=3", "postgres://u:p%3Fx@h/db"] {
            assert_eq!(split(url), (url.to_owned(), UrlTls::default()), "{url}");
        }
        let (rest, tls) = split("postgres://u:pa?ss@h/db?sslmode=require");
        assert_eq!(rest, "postgres://u:pa?ss@h/db");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));
        let (rest, tls) = split("postgres://h?sslmode=disable");
        assert_eq!((rest.as_str(), tls.sslmode.as_deref()), ("postgres://h", Some("disable")));
    }

    #[test]
    fn key_value_form_is_split_too() {
        let (rest, tls) =
            split("host=db port=5432 sslmode = verify-ca sslrootcert='/etc/my ca.pem' user=relay password='it\\'s'");
        assert_eq!(rest, "host=db port=5432 user=relay password='it\\'s'");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"it's"[..]));
        assert!(split_connection_string("host=db sslmode").is_err());
    }

    #[test]
    fn errors_never_quote_the_connection_string() {
        let err = split_connection_string("postgres://u:s3cret@h/db?sslrootcert=%zz").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn percent_escapes_are_decoded_and_malformed_ones_refused_as_libpq_does() {
        let (_, tls) = split("postgres://h/db?sslrootcert=%2Ftmp%2Fmy%20ca.pem&sslkey=%C3%BC.pem");
        assert_eq!(tls.sslrootcert.as_deref(), Some("/tmp/my ca.pem"));
        assert_eq!(tls.sslkey.as_deref(), Some("ü.pem"));
        for bad in ["postgres://h/db?sslmode=%", "postgres://h/db?sslmode=%4", "postgres://h/db?sslcert=%ff"] {
            assert!(split_connection_string(bad).is_err(), "{bad}");
        }
    }
}
