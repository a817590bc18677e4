//! The info protocol (PROTOCOL.md §1.14 and §3): `\n`-terminated commands, each answered
//! with the command as sent, a tab, the value and a newline.

use std::fmt::Write as _;

/// The build we report: ≥ 8.1.0.0 makes clients send `user-agent-set`, ≥ 6.0 selects the
/// batch-any row layout.
pub const BUILD: &str = "8.1.0.0";
pub const EDITION: &str = "Aerospike Community Edition";
/// The cluster's partition map never changes on a single node.
pub const PARTITION_GENERATION: u32 = 1;
pub const PEERS_GENERATION: u32 = 1;
pub const REBALANCE_GENERATION: u32 = 1;
/// Commands answered per info request; the rest are dropped (clients send a handful).
pub const MAX_COMMANDS: usize = 256;
/// 512 bytes of 0xff in standard base64: this node owns all 4096 partitions.
const ALL_PARTITIONS_B64_TAIL: &str = "//8=";
const FEATURES: &str = "batch-any;batch-index;blob-bits;float;peers;pipelining;pquery;pscans;replicas;replicas-all;replicas-master;replicas-max";
const UNRECOGNIZED: &str = "ERROR:4:unrecognized command";

/// One set's line of the `sets` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetInfo {
    pub namespace: String,
    pub set: String,
    pub objects: u64,
    /// The set's truncate time in force, ms since the Citrusleaf epoch (0: none).
    pub truncate_lut_ms: u64,
}

/// What the info handler needs to know about the server.
pub trait InfoSource {
    fn node_id(&self) -> &str;
    /// The advertised service address and port.
    fn service(&self) -> (&str, u16);
    fn cluster_name(&self) -> Option<&str>;
    fn namespaces(&self) -> Vec<String>;
    /// `key=value` statistics of a namespace; `None` when it does not exist.
    fn namespace_stats(&self, ns: &str) -> Option<Vec<(String, String)>>;
    /// `key=value` statistics of the node.
    fn statistics(&self) -> Vec<(String, String)>;
    /// Every set of every namespace.
    fn sets(&self) -> Vec<SetInfo>;
    /// Truncate a namespace (`set` None) or one set; `before_ms` is in ms since the
    /// Citrusleaf epoch, `None` meaning now. `Err` carries the message for the client.
    fn truncate(&self, ns: &str, set: Option<&str>, before_ms: Option<u64>) -> Result<(), String>;
}

/// Nanoseconds since the Unix epoch (a truncate's `lut=`) to ms since the Citrusleaf epoch.
fn lut_nanos_to_cl_ms(nanos: u64) -> Option<u64> {
    (nanos / 1_000_000).checked_sub(ferrospike_engine::types::CITRUSLEAF_EPOCH_UNIX * 1000).filter(|&ms| ms > 0)
}

/// `key=value` pairs of a `;`-separated info argument.
fn params(arg: Option<&str>) -> Vec<(&str, &str)> {
    arg.unwrap_or("").split(';').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect()
}

/// `truncate:namespace=NS;set=SET[;lut=NANOS|now]` and
/// `truncate-namespace:namespace=NS[;lut=NANOS|now]`.
fn truncate(name: &str, arg: Option<&str>, src: &dyn InfoSource) -> String {
    let mut ns = None;
    let mut set = None;
    let mut lut = None;
    for (k, v) in params(arg) {
        match k {
            "namespace" => ns = Some(v),
            "set" if name == "truncate" => set = Some(v),
            "lut" => lut = Some(v),
            _ => return format!("ERROR:4:unknown parameter {k}"),
        }
    }
    let Some(ns) = ns.filter(|n| !n.is_empty()) else {
        return "ERROR:4:missing namespace".to_string();
    };
    let before_ms = match lut {
        None | Some("now") => None,
        Some(v) => match v.parse::<u64>().ok().and_then(lut_nanos_to_cl_ms) {
            Some(ms) => Some(ms),
            None => return format!("ERROR:4:bad lut {v}: nanoseconds since 1970 after 2010-01-01, or now"),
        },
    };
    match src.truncate(ns, set.filter(|s| !s.is_empty()), before_ms) {
        Ok(()) => "ok".to_string(),
        Err(e) => e,
    }
}

/// `sets`, `sets/NS` and `sets/NS/SET`: one `:`-separated line per set, each ended by `;`.
fn sets(arg: Option<&str>, src: &dyn InfoSource) -> String {
    let mut parts = arg.unwrap_or("").splitn(2, '/');
    let ns = parts.next().filter(|s| !s.is_empty());
    let set = parts.next().filter(|s| !s.is_empty());
    let mut out = String::new();
    for s in src.sets() {
        if ns.is_some_and(|n| n != s.namespace) || set.is_some_and(|n| n != s.set) {
            continue;
        }
        let _ = write!(
            out,
            "ns={}:set={}:objects={}:tombstones=0:truncate_lut={}:sindexes=0:index_populating=false:truncating=false:\
             disable-eviction=false:enable-index=false:stop-writes-count=0:stop-writes-size=0;",
            s.namespace, s.set, s.objects, s.truncate_lut_ms
        );
    }
    out
}

/// The replicas bitmap of a node owning every partition (684 characters).
pub fn all_partitions_bitmap() -> String {
    let mut s = "/".repeat(680);
    s.push_str(ALL_PARTITIONS_B64_TAIL);
    s
}

fn kv_list(kv: &[(String, String)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in kv.iter().enumerate() {
        if i > 0 {
            s.push(';');
        }
        let _ = write!(s, "{k}={v}");
    }
    s
}

/// The value of one command (without the echo).
fn value(cmd: &str, src: &dyn InfoSource) -> String {
    let (name, arg) = match cmd.find(['/', ':']) {
        Some(i) => (&cmd[..i], Some(&cmd[i + 1..])),
        None => (cmd, None),
    };
    let (addr, port) = src.service();
    match name {
        "node" => src.node_id().to_string(),
        "build" => BUILD.to_string(),
        "version" => format!("{EDITION} build {BUILD}"),
        "edition" => EDITION.to_string(),
        "status" => "ok".to_string(),
        "partitions" => "4096".to_string(),
        "features" => FEATURES.to_string(),
        "partition-generation" => PARTITION_GENERATION.to_string(),
        "peers-generation" => PEERS_GENERATION.to_string(),
        "rebalance-generation" => REBALANCE_GENERATION.to_string(),
        "peers-clear-std" | "peers-clear-alt" | "peers-tls-std" | "peers-tls-alt" => {
            format!("{PEERS_GENERATION},{port},[]")
        }
        "service" | "service-clear-std" => format!("{addr}:{port}"),
        "service-clear-alt" | "service-tls-std" | "service-tls-alt" | "services" | "services-alumni" => String::new(),
        "cluster-name" => src.cluster_name().unwrap_or("null").to_string(),
        "user-agent-set" => "ok".to_string(),
        "replicas" | "replicas-all" => {
            let bitmap = all_partitions_bitmap();
            src.namespaces().iter().map(|ns| format!("{ns}:0,1,{bitmap}")).collect::<Vec<_>>().join(";")
        }
        "namespaces" => src.namespaces().join(";"),
        "namespace" => match arg.and_then(|ns| src.namespace_stats(ns)) {
            Some(kv) => kv_list(&kv),
            None => "type=unknown".to_string(),
        },
        "sets" => sets(arg, src),
        "statistics" => kv_list(&src.statistics()),
        "truncate" | "truncate-namespace" => truncate(name, arg, src),
        _ => UNRECOGNIZED.to_string(),
    }
}

/// Answer an info request body. Only `\n`-terminated commands are processed; an empty body
/// gets a summary of common values.
pub fn handle(body: &[u8], src: &dyn InfoSource) -> Vec<u8> {
    let mut out = String::new();
    if body.is_empty() {
        for cmd in ["node", "build", "edition", "version", "partition-generation", "features", "cluster-name"] {
            let _ = writeln!(out, "{cmd}\t{}", value(cmd, src));
        }
        return out.into_bytes();
    }
    let text = String::from_utf8_lossy(body);
    let mut lines: Vec<&str> = text.split('\n').collect();
    // The piece after the last newline (empty when the body ends in one) is not a command.
    lines.pop();
    for cmd in lines.into_iter().take(MAX_COMMANDS) {
        let v = if cmd.is_empty() { UNRECOGNIZED.to_string() } else { value(cmd, src) };
        let _ = writeln!(out, "{cmd}\t{v}");
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl InfoSource for Fake {
        fn node_id(&self) -> &str {
            "BB9020011AC4202"
        }
        fn service(&self) -> (&str, u16) {
            ("127.0.0.1", 3000)
        }
        fn cluster_name(&self) -> Option<&str> {
            None
        }
        fn namespaces(&self) -> Vec<String> {
            vec!["test".into()]
        }
        fn namespace_stats(&self, ns: &str) -> Option<Vec<(String, String)>> {
            (ns == "test").then(|| vec![("objects".into(), "3".into()), ("type".into(), "device".into())])
        }
        fn statistics(&self) -> Vec<(String, String)> {
            vec![("client_connections".into(), "1".into())]
        }
        fn sets(&self) -> Vec<SetInfo> {
            vec![
                SetInfo { namespace: "test".into(), set: "demo".into(), objects: 2, truncate_lut_ms: 0 },
                SetInfo { namespace: "test".into(), set: "other".into(), objects: 0, truncate_lut_ms: 5 },
            ]
        }
        fn truncate(&self, ns: &str, set: Option<&str>, before_ms: Option<u64>) -> Result<(), String> {
            if ns != "test" {
                return Err("ERROR:20:namespace not found".into());
            }
            Err(format!("called {set:?} {before_ms:?}"))
        }
    }

    fn ask(s: &str) -> String {
        String::from_utf8(handle(s.as_bytes(), &Fake)).unwrap()
    }

    #[test]
    fn python_seed_validation_is_positional() {
        assert_eq!(
            ask("node\npartition-generation\nbuild\n"),
            "node\tBB9020011AC4202\npartition-generation\t1\nbuild\t8.1.0.0\n"
        );
        assert_eq!(
            ask("user-agent-set:value=MSxweXRob24tMTkuMy4wLG5vdC1zZXQ=\n"),
            "user-agent-set:value=MSxweXRob24tMTkuMy4wLG5vdC1zZXQ=\tok\n"
        );
        assert_eq!(ask("peers-clear-std\n"), "peers-clear-std\t1,3000,[]\n");
        assert_eq!(ask("cluster-name\n"), "cluster-name\tnull\n");
    }

    #[test]
    fn replicas_bitmap_is_684_chars_of_ones() {
        let r = ask("replicas\npartition-generation\n");
        let line = r.lines().next().unwrap();
        let v = line.strip_prefix("replicas\ttest:0,1,").unwrap();
        assert_eq!(v.len(), 684);
        assert!(v.ends_with("//8="));
        assert_eq!(r.lines().nth(1), Some("partition-generation\t1"));
    }

    #[test]
    fn sets_lines_and_filters() {
        let all = ask("sets\n");
        assert!(all.starts_with("sets\tns=test:set=demo:objects=2:tombstones=0:truncate_lut=0:"), "{all}");
        assert_eq!(all.matches(';').count(), 2);
        assert!(ask("sets/test/other\n").contains("set=other:objects=0:tombstones=0:truncate_lut=5:"));
        assert_eq!(ask("sets/test/other\n").matches("ns=").count(), 1);
        assert_eq!(ask("sets/nope\n"), "sets/nope\t\n");
    }

    #[test]
    fn truncate_commands_parse_as_the_clients_send_them() {
        assert_eq!(
            ask("truncate:namespace=test;set=demo\n"),
            "truncate:namespace=test;set=demo\tcalled Some(\"demo\") None\n"
        );
        // 2020-01-01T00:00:00Z in ns since 1970 = 315532800000 ms after 2010-01-01.
        assert_eq!(
            ask("truncate-namespace:namespace=test;lut=1577836800000000000\n"),
            "truncate-namespace:namespace=test;lut=1577836800000000000\tcalled None Some(315532800000)\n"
        );
        assert!(ask("truncate:namespace=test;set=demo;lut=now\n").contains("called Some(\"demo\") None"));
        assert!(ask("truncate:namespace=test;set=d;lut=12\n").contains("\tERROR:4:bad lut 12"));
        assert!(ask("truncate:namespace=test;lut=abc\n").contains("\tERROR:4:bad lut abc"));
        assert!(ask("truncate:set=demo\n").contains("\tERROR:4:missing namespace"));
        assert!(ask("truncate:namespace=nope\n").contains("\tERROR:20:namespace not found"));
        assert!(ask("truncate-namespace:namespace=test;set=x\n").contains("\tERROR:4:unknown parameter set"));
    }

    #[test]
    fn unknown_empty_and_unterminated_commands() {
        assert_eq!(ask("bogus-cmd\n"), "bogus-cmd\tERROR:4:unrecognized command\n");
        assert_eq!(ask("node"), "");
        assert_eq!(ask("\n"), "\tERROR:4:unrecognized command\n");
        assert_eq!(ask("namespace/test\n"), "namespace/test\tobjects=3;type=device\n");
        assert_eq!(ask("namespace/nope\n"), "namespace/nope\ttype=unknown\n");
        assert!(ask("").contains("build\t8.1.0.0\n"));
        assert_eq!(ask(&"node\n".repeat(10_000)).lines().count(), MAX_COMMANDS);
    }
}
