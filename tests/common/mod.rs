//! Helpers shared by the end-to-end tests: scratch directories, loop devices, record
//! generators. Every test that wants a loop device says which device it got.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command as Proc;

use ferrospike_engine::io::DeviceSpec;
use ferrospike_engine::{Bin, Digest, UserKey, Value};
use rand::{Rng, SeedableRng};

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A scratch directory under the cargo target directory (a real filesystem with O_DIRECT,
/// unlike a tmpfs /tmp), removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = base.join(format!("{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("create test dir");
        TestDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loop device over a sparse file, detached on drop.
pub struct LoopDevice {
    pub dev: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    /// Create one when running as root with losetup available; `Err` says why not.
    pub fn create(dir: &Path, size: u64) -> Result<LoopDevice, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let backing = dir.join("loop.img");
        let f = std::fs::File::create(&backing).map_err(|e| e.to_string())?;
        f.set_len(size).map_err(|e| e.to_string())?;
        drop(f);
        let out = Proc::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Ok(LoopDevice { dev, backing })
    }

    pub fn spec(&self) -> DeviceSpec {
        DeviceSpec { path: self.dev.clone(), file_size: None }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Proc::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

pub fn file_spec(dir: &TestDir, name: &str, size: u64) -> DeviceSpec {
    DeviceSpec { path: dir.path(name), file_size: Some(size) }
}

pub fn digest_of(i: u64) -> (Digest, Vec<u8>) {
    let key = UserKey::Int(i as i64);
    (key.digest("demo"), key.to_field())
}

/// Deterministic record number `i` of a run seeded `seed`: mixed sizes from 16 B to 100 KiB
/// (log-uniform) and every bin type.
pub fn gen_bins(seed: u64, i: u64) -> Vec<Bin> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let exp: f64 = rng.gen_range(4.0..16.6); // 2^4 = 16 B .. 2^16.6 ≈ 100 KiB
    let size = (2f64.powf(exp) as usize).min(100 * 1024);
    let blob = pattern(rng.gen(), size);
    let mut bins = vec![Bin::new("blob", Value::Blob(blob)), Bin::new("i", Value::Int(rng.gen()))];
    match i % 8 {
        0 => bins.push(Bin::new("f", Value::Float(rng.gen::<f64>() * 1e6))),
        1 => bins.push(Bin::new("s", Value::Str(format!("str-{i}-{}", rng.gen::<u32>()).into_bytes()))),
        2 => bins.push(Bin::new("b", Value::Bool(rng.gen()))),
        3 => bins.push(Bin::new("l", Value::List(vec![0x92, 0x01, 0xa2, 0x03, b'x']))),
        4 => bins.push(Bin::new("m", Value::Map(vec![0x81, 0xa2, 0x03, b'k', 0x02]))),
        5 => bins.push(Bin::new(
            "g",
            Value::GeoJson(b"\x00\x00\x00{\"type\":\"Point\",\"coordinates\":[1.5,2.5]}".to_vec()),
        )),
        6 => bins.push(Bin::new("h", Value::Hll(vec![7u8; 48]))),
        _ => bins.push(Bin::new("py", Value::Other(9, vec![0x80, 0x04, 0x4b, 0x01]))),
    }
    bins
}

/// `len` pseudo-random bytes from `seed` (xorshift; cheap even in debug builds).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A device for a test: a loop device when the test runs as root and one can be set up,
/// else a file; says which on stderr.
pub fn loop_or_file(dir: &TestDir, size: u64) -> (ferrospike_engine::io::DeviceSpec, Option<LoopDevice>) {
    match LoopDevice::create(&dir.0, size) {
        Ok(l) => {
            eprintln!("using loop device {} ({} MiB, direct-io on)", l.dev.display(), size >> 20);
            (l.spec(), Some(l))
        }
        Err(why) => {
            eprintln!("NO LOOP DEVICE ({why}): falling back to a file device");
            (file_spec(dir, "fallback.dat", size), None)
        }
    }
}

/// Run commands with up to `depth` in flight, calling `on_reply` with each command's index.
/// DEVICE_OVERLOAD (the engine's back-pressure) is retried after a short pause, as a client
/// would.
pub fn pipeline(
    engine: &ferrospike_engine::Engine,
    cmds: impl Iterator<Item = ferrospike_engine::Command>,
    depth: usize,
    mut on_reply: impl FnMut(usize, ferrospike_engine::Reply),
) {
    use std::collections::HashMap;
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut pending: HashMap<usize, ferrospike_engine::Command> = HashMap::new();
    let submit = |i: usize, cmd: ferrospike_engine::Command| {
        let tx = tx.clone();
        engine.submit(cmd, move |r| {
            let _ = tx.send((i, r));
        });
    };
    let mut wait_one = |pending: &mut HashMap<usize, ferrospike_engine::Command>| {
        let (j, r): (usize, ferrospike_engine::Reply) = rx.recv().expect("reply");
        if r.result == ferrospike_engine::ResultCode::DeviceOverload {
            std::thread::sleep(std::time::Duration::from_millis(2));
            submit(j, pending[&j].clone());
        } else {
            pending.remove(&j);
            on_reply(j, r);
        }
    };
    for (i, cmd) in cmds.enumerate() {
        while pending.len() >= depth {
            wait_one(&mut pending);
        }
        pending.insert(i, cmd.clone());
        submit(i, cmd);
    }
    while !pending.is_empty() {
        wait_one(&mut pending);
    }
}

/// Wait until a `ferrospike` process started with `port = 0` logs its `listening on
/// ADDR:PORT` line (the `nth`, counting from 1, for a process restarted on the same log) and
/// answers an info request on that port; returns the port.
///
/// The server picks its own port, so two tests can never race for one, and the info round
/// trip proves that a ferrospike answers there (a bare connect can reach something else, or
/// the socket itself when the kernel picks the destination port as the source).
pub fn wait_listening(child: &mut std::process::Child, log: &Path, nth: usize) -> u16 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let text = || std::fs::read_to_string(log).unwrap_or_default();
    let port = loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("ferrospike exited during start-up ({st}):\n{}", text());
        }
        if let Some(p) = text().lines().filter_map(listening_port).nth(nth - 1) {
            break p;
        }
        if std::time::Instant::now() > deadline {
            panic!("ferrospike did not log `listening on` within 60 s:\n{}", text());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    match info_round_trip(port, "node\n") {
        Ok(body) if body.starts_with("node\t") => port,
        Ok(body) => panic!("port {port} answered {body:?} to `node`, not a ferrospike:\n{}", text()),
        Err(e) => panic!("ferrospike logged port {port} but did not answer `node` there: {e}\n{}", text()),
    }
}

/// The port of a `listening on ADDR:PORT: ...` log line.
fn listening_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?.trim_end_matches(':');
    addr.rsplit(':').next()?.parse().ok()
}

/// Send one info request on a fresh connection and return the response body.
pub fn info_round_trip(port: u16, cmds: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    if s.local_addr()? == s.peer_addr()? {
        return Err(std::io::Error::other("connected to itself"));
    }
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut frame = vec![2u8, 1, 0, 0, 0, 0, 0, 0];
    frame[2..8].copy_from_slice(&(cmds.len() as u64).to_be_bytes()[2..]);
    frame.extend_from_slice(cmds.as_bytes());
    s.write_all(&frame)?;
    let mut h = [0u8; 8];
    s.read_exact(&mut h)?;
    let n = (u64::from_be_bytes(h) & ((1 << 48) - 1)) as usize;
    let mut body = vec![0; n];
    s.read_exact(&mut body)?;
    String::from_utf8(body).map_err(std::io::Error::other)
}
