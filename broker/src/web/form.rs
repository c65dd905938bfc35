//! `application/x-www-form-urlencoded` bodies, as browsers send HTML forms: a small strict
//! decoder, so a malformed form is our error page and not a generic rejection.

/// Most fields a form of ours may have; more is not a form of ours.
const MAX_FIELDS: usize = 16;

/// The fields of a form, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("the form has more than {MAX_FIELDS} fields")]
    TooManyFields,
    #[error("the form has a broken %-escape")]
    BadEscape,
    #[error("the form is not UTF-8")]
    NotUtf8,
    #[error("the form names the field {0:?} twice")]
    Duplicate(String),
}

impl Form {
    pub fn parse(body: &[u8]) -> Result<Form, FormError> {
        let mut fields: Vec<(String, String)> = Vec::new();
        for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
            if fields.len() == MAX_FIELDS {
                return Err(FormError::TooManyFields);
            }
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            let name = decode(name)?;
            if fields.iter().any(|(n, _)| *n == name) {
                return Err(FormError::Duplicate(name));
            }
            fields.push((name, decode(value)?));
        }
        Ok(Form(fields))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn decode(raw: &[u8]) -> Result<String, FormError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3).ok_or(FormError::BadEscape)?;
                let text = std::str::from_utf8(hex).map_err(|_| FormError::BadEscape)?;
                out.push(u8::from_str_radix(text, 16).map_err(|_| FormError::BadEscape)?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_browsers_send() {
        let f = Form::parse(b"csrf=v1.17.ab&reason=not+yours%21+%C3%A9%26%3D&remember=").unwrap();
        assert_eq!(f.get("csrf"), Some("v1.17.ab"));
        assert_eq!(f.get("reason"), Some("not yours! é&="));
        assert_eq!(f.get("remember"), Some(""));
        assert_eq!(f.get("bot"), None);
        assert_eq!(Form::parse(b"").unwrap(), Form::default());
        assert_eq!(Form::parse(b"flag").unwrap().get("flag"), Some(""));
    }

    #[test]
    fn refuses_malformed_forms() {
        assert_eq!(Form::parse(b"a=%zz"), Err(FormError::BadEscape));
        assert_eq!(Form::parse(b"a=%4"), Err(FormError::BadEscape));
        assert_eq!(Form::parse(b"a=%ff"), Err(FormError::NotUtf8));
        assert_eq!(
            Form::parse(b"csrf=a&csrf=b"),
            Err(FormError::Duplicate("csrf".into()))
        );
        let many: Vec<String> = (0..17).map(|i| format!("f{i}=x")).collect();
        assert_eq!(
            Form::parse(many.join("&").as_bytes()),
            Err(FormError::TooManyFields)
        );
    }
}
