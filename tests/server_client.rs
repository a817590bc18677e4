//! End to end with the official Rust client (`aerospike` 3.x) against a `ferrospike`
//! process: every single-record command and write policy, operate, batch, scan, info, and a
//! restart with the data still there.

// Policies are adjusted field by field, as the client's own examples do.
#![allow(clippy::field_reassign_with_default)]

mod common;
mod server_support;

use std::time::Duration;

use aerospike::operations;
use aerospike::policy::{
    AdminPolicy, BatchPolicy, ClientPolicy, Expiration, GenerationPolicy, QueryPolicy, ReadPolicy, RecordExistsAction,
    WritePolicy,
};
use aerospike::query::{PartitionFilter, Statement};
use aerospike::{
    as_bin, as_key, BatchDeletePolicy, BatchOperation, BatchReadPolicy, BatchWritePolicy, Bins, Client, Value,
};
use futures::StreamExt;
use server_support::{Scratch, ServerProc};

async fn connect(s: &ServerProc) -> Client {
    match Client::new(&ClientPolicy::default(), &s.addr()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "connect to ferrospike at {}: {e:?}\ninfo `node` on a fresh socket: {:?}\nserver log:\n{}",
            s.addr(),
            common::info_round_trip(s.port, "node\n"),
            s.log_text()
        ),
    }
}

fn rc(e: &aerospike::Error) -> i32 {
    e.result_code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_record_commands_and_policies() {
    let dir = Scratch::new("server-client-single");
    let srv = ServerProc::start(&dir, "");
    let client = connect(&srv).await;
    let rp = ReadPolicy::default();
    let wp = WritePolicy::default();
    let key = as_key!("test", "demo", "key1");

    // put / get all / get named bins / header / exists
    let bins = [as_bin!("i", 1), as_bin!("s", "abc"), as_bin!("f", 1.5), as_bin!("b", vec![0u8, 1])];
    client.put(&wp, &key, &bins).await.unwrap();
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    assert_eq!(rec.generation, 1);
    assert_eq!(rec.bins.get("i"), Some(&Value::Int(1)));
    assert_eq!(rec.bins.get("s"), Some(&Value::from("abc")));
    assert_eq!(rec.bins.get("f"), Some(&Value::from(1.5)));
    assert_eq!(rec.bins.get("b"), Some(&Value::Blob(vec![0, 1])));
    let rec = client.get(&rp, &key, ["s", "nope"]).await.unwrap();
    assert_eq!(rec.bins.len(), 1);
    assert_eq!(rec.bins.get("s"), Some(&Value::from("abc")));
    let rec = client.get(&rp, &key, Bins::None).await.unwrap();
    assert!(rec.bins.is_empty());
    assert_eq!(rec.generation, 1);
    assert!(client.exists(&rp, &key).await.unwrap());
    assert!(!client.exists(&rp, &as_key!("test", "demo", "missing")).await.unwrap());
    let e = client.get(&rp, &as_key!("test", "demo", "missing"), Bins::All).await.unwrap_err();
    assert_eq!(rc(&e), 2, "{e}");

    // touch bumps the generation; touch of a missing record is NOT_FOUND
    client.touch(&wp, &key).await.unwrap();
    assert_eq!(client.get(&rp, &key, Bins::None).await.unwrap().generation, 2);
    let e = client.touch(&wp, &as_key!("test", "demo", "missing")).await.unwrap_err();
    assert_eq!(rc(&e), 2, "{e}");

    // operate with RESPOND_ALL_OPS: results in op order, NULL for the writes
    let ops = [
        operations::add(&as_bin!("i", 10)),
        operations::get_bin("i"),
        operations::append(&as_bin!("s", "!")),
        operations::get_bin("s"),
        operations::prepend(&as_bin!("s", "<")),
        operations::get_bin("s"),
    ];
    let rec = client.operate(&wp, &key, &ops).await.unwrap();
    let results = rec.results.expect("positional results");
    assert_eq!(
        results,
        vec![Value::Nil, Value::Int(11), Value::Nil, Value::from("abc!"), Value::Nil, Value::from("<abc!")]
    );
    assert_eq!(rec.generation, 3);
    // operate put + get(): all bins after the write
    let rec = client.operate(&wp, &key, &[operations::put(&as_bin!("n", 5)), operations::get()]).await.unwrap();
    assert_eq!(rec.bins.get("n"), Some(&Value::Int(5)));
    assert_eq!(rec.bins.get("i"), Some(&Value::Int(11)));
    // operate delete-all + touch are record ops; delete() removes the bins
    let k2 = as_key!("test", "demo", "ops-delete");
    client.put(&wp, &k2, &[as_bin!("x", 1)]).await.unwrap();
    client.operate(&wp, &k2, &[operations::delete(), operations::put(&as_bin!("y", 2))]).await.unwrap();
    let rec = client.get(&rp, &k2, Bins::All).await.unwrap();
    assert_eq!(rec.bins.len(), 1);
    assert_eq!(rec.bins.get("y"), Some(&Value::Int(2)));
    // incr on a string bin is INCOMPATIBLE_TYPE
    let e = client.operate(&wp, &key, &[operations::add(&as_bin!("s", 1))]).await.unwrap_err();
    assert_eq!(rc(&e), 12, "{e}");

    // generation EQ: a stale generation conflicts, the current one applies
    let gen = client.get(&rp, &key, Bins::None).await.unwrap().generation;
    let mut p = WritePolicy::default();
    p.generation_policy = GenerationPolicy::ExpectGenEqual;
    p.generation = gen + 5;
    let e = client.put(&p, &key, &[as_bin!("g", 1)]).await.unwrap_err();
    assert_eq!(rc(&e), 3, "{e}");
    p.generation = gen;
    client.put(&p, &key, &[as_bin!("g", 1)]).await.unwrap();
    let mut p = WritePolicy::default();
    p.generation_policy = GenerationPolicy::ExpectGenGreater;
    p.generation = gen;
    assert_eq!(rc(&client.put(&p, &key, &[as_bin!("g", 2)]).await.unwrap_err()), 3);
    // generation GT: one above the record's (gen + 1 after the write above) applies
    p.generation = gen + 2;
    client.put(&p, &key, &[as_bin!("g", 3)]).await.unwrap();
    let rec = client.get(&rp, &key, Bins::All).await.unwrap();
    assert_eq!((rec.generation, rec.bins.get("g")), (gen + 2, Some(&aerospike::Value::from(3))));

    // exists actions
    let fresh = as_key!("test", "demo", "fresh");
    let mut p = WritePolicy::default();
    p.record_exists_action = RecordExistsAction::UpdateOnly;
    assert_eq!(rc(&client.put(&p, &fresh, &[as_bin!("a", 1)]).await.unwrap_err()), 2);
    p.record_exists_action = RecordExistsAction::ReplaceOnly;
    assert_eq!(rc(&client.put(&p, &fresh, &[as_bin!("a", 1)]).await.unwrap_err()), 2);
    p.record_exists_action = RecordExistsAction::CreateOnly;
    client.put(&p, &fresh, &[as_bin!("a", 1), as_bin!("b", 2)]).await.unwrap();
    assert_eq!(rc(&client.put(&p, &fresh, &[as_bin!("a", 1)]).await.unwrap_err()), 5);
    p.record_exists_action = RecordExistsAction::Replace;
    client.put(&p, &fresh, &[as_bin!("c", 3)]).await.unwrap();
    let rec = client.get(&rp, &fresh, Bins::All).await.unwrap();
    assert_eq!(rec.bins.len(), 1, "replace drops the other bins");
    p.record_exists_action = RecordExistsAction::UpdateOnly;
    client.put(&p, &fresh, &[as_bin!("d", 4)]).await.unwrap();
    assert_eq!(client.get(&rp, &fresh, Bins::All).await.unwrap().bins.len(), 2);

    // delete: true when it existed, false after
    assert!(client.delete(&wp, &fresh).await.unwrap());
    assert!(!client.delete(&wp, &fresh).await.unwrap());
    assert!(!client.exists(&rp, &fresh).await.unwrap());
    // a durable delete succeeds (every delete leaves a tombstone here; Aerospike CE answers
    // ENTERPRISE_ONLY, Enterprise applies it)
    let durable = as_key!("test", "demo", "durable");
    client.put(&wp, &durable, &[as_bin!("a", 1)]).await.unwrap();
    let mut p = WritePolicy::default();
    p.durable_delete = true;
    assert!(client.delete(&p, &durable).await.unwrap());
    assert!(!client.exists(&rp, &durable).await.unwrap());

    // TTL: a 1-second record expires; never-expire and keep behave
    let short = as_key!("test", "demo", "short");
    let mut p = WritePolicy::default();
    p.expiration = Expiration::Seconds(1);
    client.put(&p, &short, &[as_bin!("a", 1)]).await.unwrap();
    assert!(client.get(&rp, &short, Bins::None).await.unwrap().time_to_live().is_some());
    p.expiration = Expiration::Never;
    let never = as_key!("test", "demo", "never");
    client.put(&p, &never, &[as_bin!("a", 1)]).await.unwrap();
    assert!(client.get(&rp, &never, Bins::None).await.unwrap().time_to_live().is_none());
    // A UDF call and a query with a secondary-index filter are UNSUPPORTED_FEATURE (16)
    let e = client.execute_udf(&wp, &key, "pkg", "fun", &[]).await.unwrap_err();
    assert_eq!(rc(&e), 16, "{e}");
    let mut st = Statement::new("test", "demo", Bins::All);
    st.set_filter(aerospike::query::Filter::equal("s", 1i64));
    let answer = match client.query(&QueryPolicy::default(), PartitionFilter::all(), st).await {
        Err(e) => Err(e),
        Ok(rs) => {
            let mut stream = rs.into_stream();
            let mut first_error = None;
            while let Some(r) = stream.next().await {
                if let Err(e) = r {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        }
    };
    assert_eq!(answer.map_err(|e| rc(&e)), Err(16), "a query with a secondary-index filter");

    // TTL -2 (don't update): a write keeps the record's expiry
    let kept = as_key!("test", "demo", "kept");
    let mut p = WritePolicy::default();
    p.expiration = Expiration::Seconds(1000);
    client.put(&p, &kept, &[as_bin!("a", 1)]).await.unwrap();
    p.expiration = Expiration::DontUpdate;
    client.put(&p, &kept, &[as_bin!("a", 2)]).await.unwrap();
    let ttl = client.get(&rp, &kept, Bins::None).await.unwrap().time_to_live();
    assert!(ttl.is_some_and(|t| t.as_secs() > 900 && t.as_secs() <= 1000), "TTL after a don't-update write: {ttl:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!client.exists(&rp, &short).await.unwrap(), "expired record is gone");
    assert!(client.exists(&rp, &never).await.unwrap());

    // an unknown namespace is NAMESPACE (20)... the client refuses it before sending, so
    // check the server's info answers instead
    let info = client.info(&AdminPolicy::default(), &["build", "namespaces", "namespace/test"]).await.unwrap();
    assert_eq!(info.get("build").map(String::as_str), Some("8.1.0.0"));
    assert_eq!(info.get("namespaces").map(String::as_str), Some("test"));
    assert!(info.get("namespace/test").unwrap().contains("objects="), "{info:?}");
    // `statistics` carries the engine's figures: records, index bytes per record, free
    // wblocks, device reads/writes, cache hits.
    let stats = client.info(&AdminPolicy::default(), &["statistics"]).await.unwrap();
    let stats: std::collections::HashMap<&str, &str> =
        stats["statistics"].split(';').filter_map(|kv| kv.split_once('=')).collect();
    let num = |k: &str| -> f64 { stats.get(k).unwrap_or_else(|| panic!("no {k} in {stats:?}")).parse().unwrap() };
    assert!(num("objects") >= 1.0, "{stats:?}");
    // (A handful of records: the per-partition maps' fixed bytes dominate the figure; the
    // ≤ 64 bytes target is for large counts and checked by the engine's tests.)
    let per_record = num("index_used_bytes") / (num("objects") + num("tombstones"));
    assert!((num("index_bytes_per_record") - per_record).abs() < 0.1, "{stats:?}");
    assert!(num("free_wblocks") > 0.0 && num("free_wblocks") < num("total_wblocks"), "{stats:?}");
    for k in ["device_reads", "device_writes", "cache_read_hits"] {
        num(k);
    }

    client.close().await.unwrap();
    let st = { srv }.stop();
    assert!(st.success(), "ferrospike exit status after SIGTERM: {st}");
}

async fn scan_keys(client: &Client, set: &str, max_records: u64) -> Vec<aerospike::Record> {
    let mut qp = QueryPolicy::default();
    qp.max_records = max_records;
    let rs = client.query(&qp, PartitionFilter::all(), Statement::new("test", set, Bins::All)).await.unwrap();
    let mut stream = rs.into_stream();
    let mut out = Vec::new();
    while let Some(r) = stream.next().await {
        out.push(r.expect("scan record"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_scan_and_restart() {
    let dir = Scratch::new("server-client-batch");
    let mut srv = ServerProc::start(&dir, "");
    let client = connect(&srv).await;
    let mut wp = WritePolicy::default();
    wp.send_key = true;
    for i in 0..200i64 {
        client.put(&wp, &as_key!("test", "demo", i), &[as_bin!("v", i), as_bin!("s", format!("r{i}"))]).await.unwrap();
    }
    for i in 0..20i64 {
        client.put(&wp, &as_key!("test", "other", i), &[as_bin!("v", -i)]).await.unwrap();
    }

    // batch read with missing keys
    let brp = BatchReadPolicy::default();
    let mut ops: Vec<BatchOperation> = (0..10i64)
        .map(|i| BatchOperation::read(&brp, as_key!("test", "demo", if i % 2 == 0 { i } else { 1000 + i }), Bins::All))
        .collect();
    ops.push(BatchOperation::read(&brp, as_key!("test", "demo", 4), Bins::None));
    client.batch(&BatchPolicy::default(), &mut ops).await.unwrap();
    for (i, op) in ops.iter().take(10).enumerate() {
        if i % 2 == 0 {
            let rec = op.record().unwrap_or_else(|| panic!("row {i}: {:?}", op.result_code()));
            assert_eq!(rec.bins.get("v"), Some(&Value::Int(i as i64)));
        } else {
            assert!(op.record().is_none(), "row {i} should be missing");
            assert_eq!(op.result_code(), Some(aerospike::ResultCode::KeyNotFoundError));
        }
    }
    assert!(ops[10].record().expect("header row").bins.is_empty());

    // batch write and delete rows
    let bwp = BatchWritePolicy::default();
    let bdp = BatchDeletePolicy::default();
    let mut ops = vec![
        BatchOperation::write(&bwp, as_key!("test", "demo", 500), vec![operations::put(&as_bin!("v", 500))]),
        BatchOperation::delete(&bdp, as_key!("test", "demo", 199)),
    ];
    client.batch(&BatchPolicy::default(), &mut ops).await.unwrap();
    assert_eq!(ops[0].result_code(), Some(aerospike::ResultCode::Ok));
    assert_eq!(ops[1].result_code(), Some(aerospike::ResultCode::Ok));
    let rp = ReadPolicy::default();
    assert!(client.exists(&rp, &as_key!("test", "demo", 500)).await.unwrap());
    assert!(!client.exists(&rp, &as_key!("test", "demo", 199)).await.unwrap());

    // scan of one set returns every record with its key; the other set is filtered out
    let recs = scan_keys(&client, "demo", 0).await;
    assert_eq!(recs.len(), 200, "199 of the first 200, plus key 500");
    // Every record written with send_key comes back with its key (the batch-written key 500
    // was sent without it).
    let mut keys: Vec<i64> = Vec::new();
    for r in &recs {
        let v = match r.bins.get("v") {
            Some(Value::Int(v)) => *v,
            other => panic!("scan record without bin v: {other:?}"),
        };
        if v != 500 {
            assert_eq!(r.key.as_ref().and_then(|k| k.user_key()), Some(&Value::Int(v)), "key of record {v}");
        }
        keys.push(v);
    }
    keys.sort();
    assert_eq!(keys[0], 0);
    assert_eq!(keys[198], 198);
    assert_eq!(keys[199], 500);
    assert_eq!(scan_keys(&client, "other", 0).await.len(), 20);
    let page = scan_keys(&client, "demo", 50).await;
    assert!(!page.is_empty() && page.len() <= 50, "max_records page of {}", page.len());

    // restart in the middle: the data is still there
    client.close().await.unwrap();
    let st = srv.stop();
    assert!(st.success(), "exit status {st}");
    srv.restart();
    let client = connect(&srv).await;
    for i in [0i64, 7, 198] {
        let rec = client.get(&rp, &as_key!("test", "demo", i), Bins::All).await.unwrap();
        assert_eq!(rec.bins.get("s"), Some(&Value::from(format!("r{i}"))));
    }
    assert!(!client.exists(&rp, &as_key!("test", "demo", 199)).await.unwrap());
    assert_eq!(scan_keys(&client, "demo", 0).await.len(), 200);
    assert!(srv.log_text().contains("previous shutdown was clean"));
    client.close().await.unwrap();
    assert!(srv.stop().success());
}

fn set_objects(info: &str, set: &str) -> Option<u64> {
    info.split(';')
        .find(|l| l.contains(&format!(":set={set}:")))
        .and_then(|l| l.split(':').find_map(|kv| kv.strip_prefix("objects=")).and_then(|v| v.parse().ok()))
}

async fn sets_info(client: &Client) -> String {
    let info = client.info(&AdminPolicy::default(), &["sets"]).await.unwrap();
    info.get("sets").cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_sets_and_restart() {
    let dir = Scratch::new("server-client-truncate");
    let mut srv = ServerProc::start(&dir, "");
    let client = connect(&srv).await;
    let wp = WritePolicy::default();
    let rp = ReadPolicy::default();
    for i in 0..100i64 {
        client.put(&wp, &as_key!("test", "gone", i), &[as_bin!("v", i)]).await.unwrap();
    }
    for i in 0..30i64 {
        client.put(&wp, &as_key!("test", "early", i), &[as_bin!("v", i)]).await.unwrap();
    }
    let sets = sets_info(&client).await;
    assert_eq!(set_objects(&sets, "gone"), Some(100), "{sets}");
    assert_eq!(set_objects(&sets, "early"), Some(30), "{sets}");

    // a set truncate, as the client sends it (no lut: now)
    let ap = AdminPolicy::default();
    client.truncate(&ap, "test", "gone", 0).await.expect("truncate set");
    for i in [0i64, 50, 99] {
        assert!(!client.exists(&rp, &as_key!("test", "gone", i)).await.unwrap(), "key {i} survived the truncate");
    }
    assert_eq!(scan_keys(&client, "gone", 0).await.len(), 0);
    assert_eq!(scan_keys(&client, "early", 0).await.len(), 30);
    let sets = sets_info(&client).await;
    assert_eq!(set_objects(&sets, "gone"), Some(0), "{sets}");
    assert!(!sets.contains("set=gone:objects=0:tombstones=0:truncate_lut=0:"), "{sets}");

    // a namespace truncate before a time: what was written before it goes, later writes stay
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut_nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..40i64 {
        client.put(&wp, &as_key!("test", "late", i), &[as_bin!("v", i)]).await.unwrap();
    }
    client.truncate(&ap, "test", "", cut_nanos).await.expect("truncate namespace");
    assert!(!client.exists(&rp, &as_key!("test", "early", 3)).await.unwrap());
    assert!(client.exists(&rp, &as_key!("test", "late", 3)).await.unwrap());

    // bad requests get an error, not a crash
    let bad = client
        .info(&ap, &["truncate:namespace=nope;set=x", "truncate-namespace:namespace=test;lut=99999999999999999999"])
        .await
        .unwrap();
    assert!(bad.values().all(|v| v.starts_with("ERROR")), "{bad:?}");
    let future = (cut_nanos + 3_600_000_000_000).to_string();
    assert!(client.truncate(&ap, "test", "late", future.parse().unwrap()).await.is_err());

    // restart: the truncated records stay gone, the later ones are there
    client.close().await.unwrap();
    assert!(srv.stop().success());
    srv.restart();
    let client = connect(&srv).await;
    assert_eq!(scan_keys(&client, "gone", 0).await.len(), 0);
    assert_eq!(scan_keys(&client, "early", 0).await.len(), 0);
    assert_eq!(scan_keys(&client, "late", 0).await.len(), 40);
    let sets = sets_info(&client).await;
    assert_eq!(set_objects(&sets, "late"), Some(40), "{sets}");
    client.close().await.unwrap();
    assert!(srv.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_resumed_page_by_page_returns_every_record_once() {
    // The client pages through a set with max_records, resuming each query from the
    // partition filter the last one left (it sends the last digest of each unfinished
    // partition in DIGEST_ARRAY): every record comes back exactly once.
    let dir = Scratch::new("server-client-pages");
    let mut srv = ServerProc::start(&dir, "");
    let client = connect(&srv).await;
    let mut wp = WritePolicy::default();
    wp.send_key = true;
    for i in 0..600 {
        client.put(&wp, &as_key!("test", "pages", i), &[as_bin!("v", i)]).await.unwrap();
    }
    let mut qp = QueryPolicy::default();
    qp.max_records = 70;
    let mut pf = PartitionFilter::all();
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    while !pf.done() {
        pages += 1;
        assert!(pages <= 60, "paging did not end after {pages} pages ({} records seen)", seen.len());
        let rs = client.query(&qp, pf, Statement::new("test", "pages", Bins::All)).await.unwrap();
        let mut stream = rs.clone().into_stream();
        let mut n = 0;
        while let Some(r) = stream.next().await {
            let r = r.expect("scan record");
            let key = r.key.as_ref().expect("record key");
            assert!(key.user_key().is_some(), "the key was sent and is returned");
            assert!(seen.insert(key.digest()), "{key:?} returned twice (page {pages})");
            n += 1;
        }
        assert!(n <= 70, "a page of {n} records with max_records 70");
        drop(stream);
        pf = rs.partition_filter().expect("the query has ended");
    }
    assert_eq!(seen.len(), 600, "records seen over {pages} pages");
    eprintln!("600 records in {pages} pages of at most 70");
    assert!(pages >= 600 / 70, "600 records in {pages} pages of at most 70");
    client.close().await.unwrap();
    assert!({ srv }.stop().success());
}
