//! Validated lock names.
//!
//! A [`Key`] is checked once, when it is made, so that every backend can rely
//! on the same rules and every valid key works on every store. Backends put
//! the key under their own prefix; [`Key::escaped`] gives a form that is safe
//! as one path segment (Consul and etcd paths, ZooKeeper nodes, URLs).

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 512;

/// A lock name, such as `order-42`.
///
/// Rules (checked by [`Key::new`]):
/// - 1 to [`MAX_KEY_LEN`] (512) bytes of UTF-8;
/// - no control characters (Unicode category `Cc`: U+0000–U+001F and
///   U+007F–U+009F, so no NUL, tab or newline).
///
/// Anything else is allowed: spaces, slashes, dots, `%`, `{}`, any script,
/// emoji. Keys compare byte by byte; `Order-42` and `order-42` are different
/// locks. Cloning a key is cheap.
///
/// ```
/// use lock_core::Key;
/// let key = Key::new("orders/42 ✓")?;
/// assert_eq!(key.as_str(), "orders/42 ✓");
/// assert!(Key::new("").is_err());
/// assert!(Key::new("a\nb").is_err());
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Checks `name` against the key rules.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        let reason = if name.is_empty() {
            Some("a key must not be empty")
        } else if name.len() > MAX_KEY_LEN {
            Some("a key must be at most 512 bytes of UTF-8")
        } else if name.chars().any(char::is_control) {
            Some("a key must not contain control characters (such as NUL, tab or newline)")
        } else {
            None
        };
        match reason {
            None => Ok(Key(Arc::from(name))),
            Some(reason) => Err(Error::InvalidKey {
                key: shorten(name),
                reason,
            }),
        }
    }

    /// The key as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as one path segment that every store accepts unchanged.
    ///
    /// Bytes outside `A–Z a–z 0–9 - _ . ~` are percent-encoded (`/` becomes
    /// `%2F`, a space `%20`, `é` `%C3%A9`), and the keys `.` and `..` become
    /// `%2E` and `%2E%2E`. The mapping is one-to-one: two different keys never
    /// give the same segment. Keys made only of the unreserved characters map
    /// to themselves, which keeps them interoperable with other tools that use
    /// the plain name.
    ///
    /// ```
    /// use lock_core::Key;
    /// assert_eq!(Key::new("order-42")?.escaped(), "order-42");
    /// assert_eq!(Key::new("a/b c")?.escaped(), "a%2Fb%20c");
    /// assert_eq!(Key::new("..")?.escaped(), "%2E%2E");
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn escaped(&self) -> String {
        if self.as_str() == "." || self.as_str() == ".." {
            return "%2E".repeat(self.len());
        }
        let mut out = String::with_capacity(self.len());
        for b in self.as_str().bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                out.push('%');
                out.push(hex_digit(b >> 4));
                out.push(hex_digit(b & 0xF));
            }
        }
        out
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: keys are never empty. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn hex_digit(n: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(n & 0xF)])
}

fn shorten(name: &str) -> String {
    let mut s: String = name.chars().take(64).collect();
    if s.len() < name.len() {
        s.push('…');
    }
    s
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Key {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Key::new(s)
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Key::new(s)
    }
}

impl TryFrom<String> for Key {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Key::new(s)
    }
}

/// Anything the client accepts as a lock name: `&str`, `String` or [`Key`].
///
/// Strings are validated on use; a bad one gives [`Error::InvalidKey`].
pub trait IntoKey {
    /// Converts into a validated key.
    fn into_key(self) -> Result<Key>;
}

impl IntoKey for Key {
    fn into_key(self) -> Result<Key> {
        Ok(self)
    }
}

impl IntoKey for &Key {
    fn into_key(self) -> Result<Key> {
        Ok(self.clone())
    }
}

impl IntoKey for &str {
    fn into_key(self) -> Result<Key> {
        Key::new(self)
    }
}

impl IntoKey for String {
    fn into_key(self) -> Result<Key> {
        Key::new(self)
    }
}

impl IntoKey for &String {
    fn into_key(self) -> Result<Key> {
        Key::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules() {
        assert!(Key::new("a").is_ok());
        assert!(Key::new("x".repeat(512)).is_ok());
        assert!(matches!(
            Key::new("x".repeat(513)),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(Key::new(""), Err(Error::InvalidKey { .. })));
        assert!(Key::new("a\0b").is_err());
        assert!(Key::new("a\tb").is_err());
        assert!(Key::new("a\u{7f}").is_err());
        assert!(Key::new("a\u{85}").is_err());
        assert!(Key::new("ключ/🔒 {x} 100%").is_ok());
        // 171 three-byte characters = 513 bytes: rejected although only 171 chars.
        assert!(Key::new("€".repeat(171)).is_err());
        assert!(Key::new("€".repeat(170)).is_ok());
    }

    #[test]
    fn error_text_is_short() {
        let err = Key::new(format!("{}\n", "y".repeat(1000))).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn escaping_examples() {
        let e = |s: &str| Key::new(s).map(|k| k.escaped()).unwrap_or_default();
        assert_eq!(e("job_1.v2~x"), "job_1.v2~x");
        assert_eq!(e("."), "%2E");
        assert_eq!(e("..."), "...");
        assert_eq!(e("%2E"), "%252E");
        assert_eq!(e("é"), "%C3%A9");
    }

    fn unescape(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn valid_iff_rules_hold(s in any::<String>()) {
            let ok = !s.is_empty() && s.len() <= MAX_KEY_LEN && !s.chars().any(char::is_control);
            prop_assert_eq!(Key::new(&s).is_ok(), ok);
        }

        #[test]
        fn escaped_is_safe_and_reversible(s in "[^\\p{Cc}]{1,100}") {
            let key = Key::new(&s).unwrap();
            let esc = key.escaped();
            prop_assert!(esc.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)));
            prop_assert!(esc != "." && esc != "..");
            prop_assert_eq!(unescape(&esc), s.as_bytes().to_vec());
        }

        #[test]
        fn escaping_is_injective(a in "[^\\p{Cc}]{1,20}", b in "[^\\p{Cc}]{1,20}") {
            let (ka, kb) = (Key::new(&a).unwrap(), Key::new(&b).unwrap());
            prop_assert_eq!(ka.escaped() == kb.escaped(), a == b);
        }
    }
}
