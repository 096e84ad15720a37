//! `removebgd accounts …` and `removebgd keys …`: administration against the daemon's database,
//! safe while the daemon runs (SQLite WAL).

use anyhow::{Context, Result};

use crate::clock::{self, rfc3339};
use crate::config::{AccountsCommand, DataArgs, KeysCommand};
use crate::store::{Account, Store};

fn open(data: &DataArgs) -> Result<Store> {
    let dir = data.data_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(crate::app::DATABASE_FILE);
    Store::open(&path).with_context(|| format!("opening {}", path.display()))
}

fn print_account(a: &Account) {
    println!(
        "{:<16} {:<10} {:>10} {:>10} {:>10} {:>10}  {}",
        a.name,
        a.plan,
        a.credits_total,
        a.credits_used,
        a.credits_reserved,
        a.remaining(),
        rfc3339(a.resets_at)
    );
}

fn account_header() {
    println!(
        "{:<16} {:<10} {:>10} {:>10} {:>10} {:>10}  RESETS AT",
        "NAME", "PLAN", "TOTAL", "USED", "RESERVED", "REMAINING"
    );
}

pub fn accounts(cmd: AccountsCommand) -> Result<()> {
    match cmd {
        AccountsCommand::Create {
            name,
            plan,
            credits,
            reset_day,
            data,
        } => {
            let a = open(&data)?.create_account(&name, &plan, credits, reset_day, clock::now())?;
            account_header();
            print_account(&a);
        }
        AccountsCommand::List { data } => {
            account_header();
            for a in open(&data)?.accounts()? {
                print_account(&a);
            }
        }
        AccountsCommand::SetCredits {
            name,
            credits,
            plan,
            data,
        } => {
            let a = open(&data)?.set_credits(&name, credits, plan.as_deref())?;
            account_header();
            print_account(&a);
        }
    }
    Ok(())
}

pub fn keys(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create {
            account,
            scopes,
            expires_in,
            data,
        } => {
            let now = clock::now();
            let expires_at = expires_in
                .map(|d| clock::parse_duration(&d).map(|d| now + d.as_secs() as i64))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--expires-in: {e}"))?;
            let created = open(&data)?.create_key(&account, &scopes, expires_at, now)?;
            let i = &created.info;
            eprintln!(
                "created key {} for account {} with scopes {}; expires {}",
                i.prefix,
                i.account,
                i.scopes.join(","),
                i.expires_at.map(rfc3339).unwrap_or_else(|| "never".into())
            );
            eprintln!("store it now: it is not shown again");
            println!("{}", created.key);
        }
        KeysCommand::List { data } => {
            let keys = open(&data)?.keys()?;
            println!(
                "{:<18} {:<16} {:<21} {:<21} {:<21} SCOPES",
                "PREFIX", "ACCOUNT", "EXPIRES", "LAST USED", "REVOKED"
            );
            let show = |t: Option<i64>| t.map(rfc3339).unwrap_or_else(|| "-".into());
            for k in keys {
                println!(
                    "{:<18} {:<16} {:<21} {:<21} {:<21} {}",
                    k.prefix,
                    k.account,
                    show(k.expires_at),
                    show(k.last_used_at),
                    show(k.revoked_at),
                    k.scopes.join(",")
                );
            }
        }
        KeysCommand::Revoke { prefix, data } => {
            let k = open(&data)?.revoke_key(&prefix, clock::now())?;
            println!("revoked {} (account {})", k.prefix, k.account);
        }
    }
    Ok(())
}
