//! Accounts, their monthly credit allowance, and the ledger every credit change goes through.

use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::Serialize;

use super::{Result, Store, StoreError};
use crate::clock;

#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub plan: String,
    pub credits_total: i64,
    pub credits_used: i64,
    pub credits_reserved: i64,
    pub reset_day: u32,
    pub resets_at: i64,
}

/// What `GET /quota` reports. Reserved credits (work in progress) count as not remaining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub plan: String,
    pub credits_total: i64,
    pub credits_used: i64,
    pub credits_remaining: i64,
    pub resets_at: i64,
}

impl Account {
    fn from_row(r: &Row) -> rusqlite::Result<Account> {
        Ok(Account {
            id: r.get("id")?,
            name: r.get("name")?,
            plan: r.get("plan")?,
            credits_total: r.get("credits_total")?,
            credits_used: r.get("credits_used")?,
            credits_reserved: r.get("credits_reserved")?,
            reset_day: r.get("reset_day")?,
            resets_at: r.get("resets_at")?,
        })
    }

    pub fn remaining(&self) -> i64 {
        (self.credits_total - self.credits_used - self.credits_reserved).max(0)
    }
}

pub(super) fn ledger(
    tx: &Transaction,
    account: i64,
    kind: &str,
    used: i64,
    reserved: i64,
    job: Option<&str>,
    note: Option<&str>,
) -> Result<()> {
    tx.execute(
        "UPDATE accounts SET credits_used = credits_used + ?2, credits_reserved = credits_reserved + ?3 WHERE id = ?1",
        params![account, used, reserved],
    )?;
    tx.execute(
        "INSERT INTO ledger (account_id, at, kind, used_delta, reserved_delta, job_id, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![account, clock::now(), kind, used, reserved, job, note],
    )?;
    Ok(())
}

/// Starts a new period for every account whose reset time has come (in this transaction).
pub(super) fn roll_periods(tx: &Transaction, now: i64) -> Result<usize> {
    let due: Vec<(i64, i64, u32, i64)> = tx
        .prepare("SELECT id, credits_used, reset_day, resets_at FROM accounts WHERE resets_at <= ?1")?
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for &(id, used, day, _) in &due {
        ledger(tx, id, "period_reset", -used, 0, None, Some("monthly reset"))?;
        tx.execute(
            "UPDATE accounts SET resets_at = ?2 WHERE id = ?1",
            params![id, clock::next_reset(now, day)],
        )?;
    }
    Ok(due.len())
}

pub(super) fn account_in(tx: &Transaction, id: i64) -> Result<Account> {
    Ok(tx.query_row("SELECT * FROM accounts WHERE id = ?1", [id], Account::from_row)?)
}

/// Holds `n` credits for work about to start, or fails with `NoCredits` changing nothing.
pub(super) fn reserve(tx: &Transaction, account: i64, n: i64, job: &str) -> Result<()> {
    roll_periods(tx, clock::now())?;
    let acc = account_in(tx, account)?;
    if acc.remaining() < n {
        return Err(StoreError::NoCredits {
            needed: n,
            available: acc.remaining(),
        });
    }
    ledger(tx, account, "reserve", 0, n, Some(job), None)
}

impl Store {
    pub fn create_account(&self, name: &str, plan: &str, credits: i64, reset_day: u32, now: i64) -> Result<Account> {
        if name.trim().is_empty() || name.contains(char::is_whitespace) {
            return Err(StoreError::Invalid(format!("account name {name:?} must be one word")));
        }
        if !(1..=28).contains(&reset_day) {
            return Err(StoreError::Invalid(format!(
                "reset day {reset_day} must be between 1 and 28 (every month has it)"
            )));
        }
        if credits < 0 {
            return Err(StoreError::Invalid("credits cannot be negative".into()));
        }
        self.write(|tx| {
            let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM accounts WHERE name = ?1)", [name], |r| {
                r.get(0)
            })?;
            if exists {
                return Err(StoreError::Invalid(format!("account {name:?} already exists")));
            }
            tx.execute(
                "INSERT INTO accounts (name, plan, credits_total, reset_day, resets_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![name, plan, credits, reset_day, clock::next_reset(now, reset_day), now],
            )?;
            account_in(tx, tx.last_insert_rowid())
        })
    }

    pub fn accounts(&self) -> Result<Vec<Account>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT * FROM accounts ORDER BY id")?;
        let rows = stmt.query_map([], Account::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn account_by_name(&self, name: &str) -> Result<Account> {
        self.conn()
            .query_row("SELECT * FROM accounts WHERE name = ?1", [name], Account::from_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no account named {name:?}")))
    }

    /// Changes the monthly allowance (and the plan name, if given).
    pub fn set_credits(&self, name: &str, credits: i64, plan: Option<&str>) -> Result<Account> {
        if credits < 0 {
            return Err(StoreError::Invalid("credits cannot be negative".into()));
        }
        let id = self.account_by_name(name)?.id;
        self.write(|tx| {
            let before = account_in(tx, id)?;
            tx.execute(
                "UPDATE accounts SET credits_total = ?2, plan = COALESCE(?3, plan) WHERE id = ?1",
                params![id, credits, plan],
            )?;
            let note = format!("credits_total {} -> {credits}", before.credits_total);
            ledger(tx, id, "allowance", 0, 0, None, Some(&note))?;
            account_in(tx, id)
        })
    }

    /// The account's quota, after applying a reset that has fallen due.
    pub fn quota(&self, account: i64) -> Result<Quota> {
        self.write(|tx| {
            roll_periods(tx, clock::now())?;
            let a = account_in(tx, account)?;
            Ok(Quota {
                credits_remaining: a.remaining(),
                plan: a.plan,
                credits_total: a.credits_total,
                credits_used: a.credits_used,
                resets_at: a.resets_at,
            })
        })
    }

    /// Applies every monthly reset due at `now`; returns how many accounts were reset.
    pub fn roll_periods(&self, now: i64) -> Result<usize> {
        self.write(|tx| roll_periods(tx, now))
    }

    /// (sum of used deltas, sum of reserved deltas) in the ledger for an account.
    pub fn ledger_sums(&self, account: i64) -> Result<(i64, i64)> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(SUM(used_delta), 0), COALESCE(SUM(reserved_delta), 0) FROM ledger WHERE account_id = ?1",
            [account],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::store;

    #[test]
    fn reserve_refuses_beyond_the_allowance_and_changes_nothing() {
        let (s, _d) = store();
        let a = s.create_account("kiosk", "Pro", 2, 1, clock::now()).unwrap();
        s.write(|tx| reserve(tx, a.id, 2, "j1")).unwrap();
        let err = s.write(|tx| reserve(tx, a.id, 1, "j2")).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::NoCredits {
                    needed: 1,
                    available: 0
                }
            ),
            "{err}"
        );
        let q = s.quota(a.id).unwrap();
        assert_eq!((q.credits_used, q.credits_remaining), (0, 0));
        assert_eq!(s.ledger_sums(a.id).unwrap(), (0, 2));
    }

    #[test]
    fn a_due_period_resets_used_credits_through_the_ledger() {
        let (s, _d) = store();
        let a = s.create_account("kiosk", "Pro", 10, 1, clock::now()).unwrap();
        s.write(|tx| ledger(tx, a.id, "charge", 3, 0, Some("j"), None)).unwrap();
        // Pretend the period ended yesterday.
        s.conn()
            .execute("UPDATE accounts SET resets_at = ?1", [clock::now() - 86_400])
            .unwrap();
        assert_eq!(s.roll_periods(clock::now()).unwrap(), 1);
        let q = s.quota(a.id).unwrap();
        assert_eq!((q.credits_used, q.credits_remaining), (0, 10));
        assert!(q.resets_at > clock::now());
        assert_eq!(s.ledger_sums(a.id).unwrap(), (0, 0));
        assert_eq!(s.roll_periods(clock::now()).unwrap(), 0, "a reset happens once");
    }

    #[test]
    fn account_names_and_reset_days_are_validated() {
        let (s, _d) = store();
        assert!(s.create_account("two words", "Pro", 1, 1, 0).is_err());
        assert!(s.create_account("x", "Pro", 1, 31, 0).is_err());
        s.create_account("x", "Pro", 1, 28, 0).unwrap();
        assert!(s.create_account("x", "Pro", 1, 1, 0).is_err(), "duplicate name");
        let a = s.set_credits("x", 50, Some("Max")).unwrap();
        assert_eq!((a.credits_total, a.plan.as_str()), (50, "Max"));
        assert!(matches!(s.set_credits("nobody", 1, None), Err(StoreError::NotFound(_))));
    }
}
