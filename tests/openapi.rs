//! The OpenAPI document (docs/openapi.json, served at /openapi.json) against the router: every
//! documented operation exists on a live daemon, and every route the router declares is
//! documented. Response shapes are checked by schemathesis in CI (scripts/schemathesis).

mod common;
mod daemon;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use daemon::*;
use serde_json::Value;

fn document() -> Value {
    serde_json::from_str(include_str!("../docs/openapi.json")).unwrap()
}

/// The paths `src/http/mod.rs` routes, with their `.nest` prefixes applied.
fn routed_paths() -> BTreeSet<String> {
    let src = include_str!("../src/http/mod.rs");
    let body = &src[src.find("pub fn router(").expect("the router function")..];
    let literal = |s: &str| s.split('"').nth(1).map(str::to_owned);
    // Routes per builder variable (`let api = Router::new() ... ;`), then where each is nested.
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let mut top = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    let mut nests = Vec::new();
    for line in body.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("let ")
            && line.contains("Router::new()")
        {
            let name = rest.split([' ', '=']).next().unwrap().trim_start_matches("mut ").to_owned();
            let name = if name == "mut" { rest.split_whitespace().nth(1).unwrap().to_owned() } else { name };
            current = Some((name, Vec::new()));
        }
        for (i, _) in line.match_indices(".nest(\"") {
            let args = &line[i + 6..];
            let prefix = literal(args).unwrap();
            let var = args.split(',').nth(1).unwrap().split(')').next().unwrap().trim().to_owned();
            nests.push((prefix, var));
        }
        let route = if line.starts_with(".route(\"") {
            literal(line)
        } else if line.starts_with(".route(") {
            None
        } else if line.starts_with('"') && line.ends_with("\",") {
            literal(line)
        } else {
            None
        };
        if let Some(r) = route {
            match &mut current {
                Some((_, routes)) => routes.push(r),
                None => top.push(r),
            }
        }
        if line.ends_with(';')
            && let Some(g) = current.take()
        {
            groups.push(g);
        }
    }
    let mut paths: BTreeSet<String> = top.into_iter().collect();
    for (prefix, var) in nests {
        let (_, routes) = groups.iter().find(|(n, _)| *n == var).unwrap_or_else(|| panic!("no builder {var}"));
        paths.extend(routes.iter().map(|r| format!("{prefix}{r}")));
    }
    paths
}

#[test]
fn every_routed_path_is_documented_and_nothing_else() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let routed = routed_paths();
    assert!(routed.len() >= 12, "the route scan found too little: {routed:?}");
    assert_eq!(documented, routed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_exists_on_a_live_daemon() {
    let d = Daemon::start(5, &["--rembg-account", "shop"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let r = d.client.get(d.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let served: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(served, document());

    let mut checked = 0;
    for (path, ops) in document()["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "batch_none").replace("{file}", "rbg_none.png");
        for method in ops.as_object().unwrap().keys() {
            let req = match method.as_str() {
                "get" => d.client.get(d.url(&concrete)),
                "post" => d.client.post(d.url(&concrete)).header("content-type", "application/json").body("{}"),
                other => panic!("{other} {path}: only get and post are routed"),
            };
            let r = req.bearer_auth(&key).send().await.unwrap();
            let status = r.status();
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
            let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
                || (status == StatusCode::NOT_FOUND && v["error"]["code"] == "not_found");
            assert!(!unrouted, "{method} {path}: {status} {v}");
            let documented = ops[method]["responses"].as_object().unwrap();
            assert!(documented.contains_key(status.as_str()), "{method} {path}: {status} is not documented");
            checked += 1;
        }
    }
    assert_eq!(checked, 17);
    // The probe can fail: an unknown path is the router's 404.
    let r = d.client.get(d.url("/v1/removebg/nothing")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
