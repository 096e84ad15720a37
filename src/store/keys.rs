//! API keys: `xbk_live_<40 hex>`. Only the SHA-256 of a key is stored; the first characters
//! (the prefix) identify it in listings and for revocation.

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Result, Store, StoreError, token};

/// The scopes the API knows.
pub const SCOPES: [&str; 4] = [
    "removebg:images:process",
    "removebg:quota:read",
    "removebg:batch:write",
    "removebg:batch:read",
];

const KEY_PREFIX: &str = "xbk_live_";
/// Characters of the secret shown in listings after `xbk_live_`.
const SHOWN: usize = 8;

/// A freshly created key: the plaintext exists only here.
pub struct CreatedKey {
    pub key: String,
    pub info: KeyInfo,
}

/// What may be shown about a key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub prefix: String,
    pub account: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A key looked up for authentication; the caller judges revocation and expiry.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: i64,
    pub account_id: i64,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// Keys with their account's name, as `key_info` reads them.
const KEY_ROWS: &str = "SELECT k.*, a.name FROM api_keys k JOIN accounts a ON a.id = k.account_id";

fn hash(key: &str) -> String {
    crate::digest::hex(&Sha256::digest(key.as_bytes()))
}

fn split_scopes(s: &str) -> Vec<String> {
    s.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

impl KeyInfo {
    fn from_row(r: &Row) -> rusqlite::Result<KeyInfo> {
        Ok(KeyInfo {
            prefix: r.get("prefix")?,
            account: r.get("name")?,
            scopes: split_scopes(&r.get::<_, String>("scopes")?),
            created_at: r.get("created_at")?,
            expires_at: r.get("expires_at")?,
            last_used_at: r.get("last_used_at")?,
            revoked_at: r.get("revoked_at")?,
        })
    }
}

impl Store {
    pub fn create_key(
        &self,
        account: &str,
        scopes: &[String],
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<CreatedKey> {
        if scopes.is_empty() {
            return Err(StoreError::Invalid("a key needs at least one scope".into()));
        }
        if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return Err(StoreError::Invalid(format!(
                "unknown scope {bad:?}; known scopes: {}",
                SCOPES.join(", ")
            )));
        }
        let acc = self.account_by_name(account)?;
        let key = format!("{KEY_PREFIX}{}", token(20));
        let prefix = key[..KEY_PREFIX.len() + SHOWN].to_owned();
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO api_keys (account_id, prefix, hash, scopes, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![acc.id, prefix, hash(&key), scopes.join(","), now, expires_at],
            )?;
            Ok(())
        })?;
        Ok(CreatedKey {
            info: KeyInfo {
                prefix,
                account: acc.name,
                scopes,
                created_at: now,
                expires_at,
                last_used_at: None,
                revoked_at: None,
            },
            key,
        })
    }

    pub fn keys(&self) -> Result<Vec<KeyInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{KEY_ROWS} ORDER BY k.id"))?;
        let rows = stmt.query_map([], KeyInfo::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Revokes the key whose prefix is (or starts with) `prefix`; it must match exactly one key.
    pub fn revoke_key(&self, prefix: &str, now: i64) -> Result<KeyInfo> {
        if prefix.len() < KEY_PREFIX.len() + 4 {
            return Err(StoreError::Invalid(format!(
                "{prefix:?} is too short; give the prefix `keys list` shows"
            )));
        }
        self.write(|tx| {
            let matches: Vec<i64> = tx
                .prepare("SELECT id FROM api_keys WHERE prefix LIKE ?1 || '%' ESCAPE '\\'")?
                .query_map([prefix.replace('_', "\\_")], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let id = match matches.as_slice() {
                [id] => *id,
                [] => return Err(StoreError::NotFound(format!("no key starts with {prefix:?}"))),
                _ => return Err(StoreError::Invalid(format!("{prefix:?} matches several keys"))),
            };
            tx.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, now],
            )?;
            Ok(tx.query_row(&format!("{KEY_ROWS} WHERE k.id = ?1"), [id], KeyInfo::from_row)?)
        })
    }

    /// Finds a key by its plaintext (via its hash).
    pub fn find_key(&self, key: &str) -> Result<Option<KeyRecord>> {
        if !key.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        Ok(self
            .conn()
            .query_row("SELECT * FROM api_keys WHERE hash = ?1", [hash(key)], |r| {
                Ok(KeyRecord {
                    id: r.get("id")?,
                    account_id: r.get("account_id")?,
                    prefix: r.get("prefix")?,
                    scopes: split_scopes(&r.get::<_, String>("scopes")?),
                    expires_at: r.get("expires_at")?,
                    revoked_at: r.get("revoked_at")?,
                    last_used_at: r.get("last_used_at")?,
                })
            })
            .optional()?)
    }

    pub fn touch_key(&self, id: i64, now: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute("UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1", params![id, now])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::store;

    fn scopes(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keys_are_stored_hashed_and_found_by_plaintext() {
        let (s, dir) = store();
        s.create_account("shop", "Pro", 1, 1, 0).unwrap();
        let k = s
            .create_key("shop", &scopes(&["removebg:quota:read"]), None, 5)
            .unwrap();
        assert!(k.key.starts_with("xbk_live_") && k.key.len() == 49);
        assert!(k.key.starts_with(&k.info.prefix));
        let found = s.find_key(&k.key).unwrap().unwrap();
        assert_eq!(found.scopes, vec!["removebg:quota:read"]);
        let last = if k.key.ends_with('a') { 'b' } else { 'a' };
        assert!(s.find_key(&format!("{}{last}", &k.key[..48])).unwrap().is_none());
        drop(s);
        let raw = std::fs::read(dir.path().join("removebgd.db")).unwrap();
        let secret = &k.key.as_bytes()[9..];
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret),
            "plaintext key in the database file"
        );
    }

    #[test]
    fn unknown_scopes_and_accounts_are_refused() {
        let (s, _d) = store();
        s.create_account("shop", "Pro", 1, 1, 0).unwrap();
        assert!(
            s.create_key("shop", &scopes(&["removebg:everything"]), None, 0)
                .is_err()
        );
        assert!(s.create_key("shop", &[], None, 0).is_err());
        assert!(matches!(
            s.create_key("nope", &scopes(&["removebg:quota:read"]), None, 0),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn revoke_by_prefix_marks_the_key() {
        let (s, _d) = store();
        s.create_account("shop", "Pro", 1, 1, 0).unwrap();
        let k = s.create_key("shop", &scopes(&SCOPES), None, 0).unwrap();
        let info = s.revoke_key(&k.info.prefix, 42).unwrap();
        assert_eq!(info.revoked_at, Some(42));
        assert_eq!(s.find_key(&k.key).unwrap().unwrap().revoked_at, Some(42));
        assert!(s.revoke_key("xbk_live_", 1).is_err(), "too short to be safe");
        assert!(matches!(
            s.revoke_key("xbk_live_zzzzzzzz", 1),
            Err(StoreError::NotFound(_))
        ));
    }
}
