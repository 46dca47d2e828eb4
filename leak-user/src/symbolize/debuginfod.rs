//! Debug info fetched by build id from the servers in `DEBUGINFOD_URLS`.
//!
//! When no local debug file fits a stripped module, and the user set
//! `DEBUGINFOD_URLS` (as for gdb or perf), we ask each server for
//! `URL/buildid/HEX/debuginfo` and keep the answer in a cache
//! (`$XDG_CACHE_HOME/leaktrace/debuginfod`, else `~/.cache/...`; under sudo, the
//! invoking user's, with files owned by them). Plain `http://` is spoken here with
//! the standard library; `https://` goes through `curl` when installed. Every
//! request has bounded time-outs, a failing server is reported in one line and not
//! asked again, and a download whose build id is not the one asked for is dropped.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::debug_file::{self, Check};

/// Time to connect, and between reads; a whole download is bounded by `TOTAL`.
const TIMEOUT: Duration = Duration::from_secs(5);
const TOTAL: Duration = Duration::from_secs(60);
/// Debug files bigger than this are not fetched.
const MAX_BYTES: usize = 1 << 30;

/// The servers and the cache.
#[derive(Debug)]
pub struct Debuginfod {
    urls: Vec<String>,
    cache: PathBuf,
    /// Who owns what we create in the cache (the sudo user).
    owner: Option<(u32, u32)>,
    failed: BTreeSet<String>,
}

impl Debuginfod {
    /// From `DEBUGINFOD_URLS` (space-separated), or `None` when unset or empty.
    pub fn from_env() -> Option<Self> {
        let urls: Vec<String> = std::env::var("DEBUGINFOD_URLS")
            .ok()?
            .split_whitespace()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect();
        if urls.is_empty() {
            return None;
        }
        let sudo = sudo_user();
        let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => sudo
                .as_ref()
                .map(|(_, _, home)| home.clone())
                .or_else(|| std::env::var_os("HOME").map(PathBuf::from))?
                .join(".cache"),
        }
        .join("leaktrace/debuginfod");
        Some(Self {
            urls,
            cache,
            owner: sudo.map(|(uid, gid, _)| (uid, gid)),
            failed: BTreeSet::new(),
        })
    }

    /// The debug file of `build_id`: from the cache, else from the first server
    /// that has it. `Err` when every server failed or none had it.
    pub fn fetch(&mut self, build_id: &[u8]) -> Result<PathBuf, ()> {
        let hex = debug_file::hex(build_id);
        let cached = self.cache.join(&hex).join("debuginfo");
        if cached.exists() {
            return Ok(cached);
        }
        let check = Check::BuildId(build_id.to_vec());
        for url in self.urls.clone() {
            if self.failed.contains(&url) {
                continue;
            }
            let full = format!("{url}/buildid/{hex}/debuginfo");
            match get(&full) {
                Ok(Some(body)) if debug_file::passes(&check, &body) => {
                    if let Err(e) = self.store(&cached, &body) {
                        eprintln!("leaktrace: debuginfod cache {}: {e}", self.cache.display());
                        return Err(());
                    }
                    return Ok(cached);
                }
                Ok(Some(_)) => {
                    log::warn!("{full}: not the debug file of build id {hex}");
                }
                Ok(None) => log::debug!("{full}: not found"),
                Err(e) => {
                    eprintln!("leaktrace: debuginfod server {url} failed: {e}");
                    self.failed.insert(url);
                }
            }
        }
        Err(())
    }

    fn store(&self, path: &Path, body: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().expect("cache entries are in a directory");
        let mut created = Vec::new();
        let mut missing = dir;
        while !missing.exists() {
            created.push(missing.to_path_buf());
            match missing.parent() {
                Some(p) => missing = p,
                None => break,
            }
        }
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("debuginfo.{}.tmp", std::process::id()));
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)?;
        if let Some((uid, gid)) = self.owner {
            for p in created.iter().map(PathBuf::as_path).chain([path]) {
                let _ = std::os::unix::fs::chown(p, Some(uid), Some(gid));
            }
        }
        Ok(())
    }
}

/// `SUDO_UID`, `SUDO_GID` and that user's home, when running under sudo.
fn sudo_user() -> Option<(u32, u32, PathBuf)> {
    let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid: u32 = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let home = home_of(&passwd, uid)?;
    Some((uid, gid, home))
}

/// The home directory of `uid` in a passwd file.
fn home_of(passwd: &str, uid: u32) -> Option<PathBuf> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 7 && fields[2].parse() == Ok(uid)).then(|| PathBuf::from(fields[5]))
    })
}

/// GETs `url`: `Ok(None)` for 404, `Err` for anything else that is not 200.
fn get(url: &str) -> Result<Option<Vec<u8>>, String> {
    if url.starts_with("https://") {
        return get_with_curl(url);
    }
    let (host, port, path) = parse_http_url(url)?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: leaktrace\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let mut response = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if start.elapsed() > TOTAL {
            return Err(format!("no complete answer in {}s", TOTAL.as_secs()));
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
        if response.len() > MAX_BYTES {
            return Err("answer too big".to_owned());
        }
    }
    parse_response(&response)
}

fn get_with_curl(url: &str) -> Result<Option<Vec<u8>>, String> {
    let out = Command::new("curl")
        .args(["-sS", "-L", "--connect-timeout"])
        .arg(TIMEOUT.as_secs().to_string())
        .arg("--max-time")
        .arg(TOTAL.as_secs().to_string())
        .args(["-w", "\n%{http_code}", url])
        .output()
        .map_err(|e| format!("https needs curl: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().next().unwrap_or("curl failed").to_owned());
    }
    let mut body = out.stdout;
    let split = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[split..]).trim().to_owned();
    body.truncate(split);
    match code.as_str() {
        "200" => Ok(Some(body)),
        "404" => Ok(None),
        c => Err(format!("HTTP {c}")),
    }
}

/// `http://host[:port]/path` → (host, port, path).
fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// or https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => {
            (h, p.parse().map_err(|_| format!("{url}: bad port {p:?}"))?)
        }
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

/// An HTTP/1.x response (read to the end of the connection) → its body.
fn parse_response(response: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header")?;
    let head = String::from_utf8_lossy(&response[..end]);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    let body = &response[end + 4..];
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    match code {
        "200" => {}
        "404" => return Ok(None),
        _ => return Err(status.trim().to_owned()),
    }
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return dechunk(body).map(Some);
    }
    match header("content-length").map(|v| v.parse::<usize>()) {
        Some(Ok(n)) if body.len() >= n => Ok(Some(body[..n].to_vec())),
        Some(Ok(n)) => Err(format!("cut short: {} of {n} bytes", body.len())),
        Some(Err(_)) => Err("bad Content-Length".to_owned()),
        None => Ok(Some(body.to_vec())),
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("cut short".to_owned());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8002/d/buildid/ab/debuginfo").unwrap(),
            (
                "127.0.0.1".to_owned(),
                8002,
                "/d/buildid/ab/debuginfo".to_owned()
            )
        );
        assert_eq!(
            parse_http_url("http://example.org").unwrap(),
            ("example.org".to_owned(), 80, "/".to_owned())
        );
        assert!(parse_http_url("ftp://x/").is_err());
        assert!(parse_http_url("http://x:port/").is_err());
    }

    #[test]
    fn reads_bodies_by_length_chunks_or_close() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabcdef";
        assert_eq!(parse_response(ok), Ok(Some(b"abc".to_vec())));
        let close = b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nabcdef";
        assert_eq!(parse_response(close), Ok(Some(b"abcdef".to_vec())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Ok(Some(b"abcde".to_vec())));
        let short = b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nabc";
        assert!(parse_response(short).is_err());
    }

    #[test]
    fn not_found_is_none_and_other_codes_fail() {
        assert_eq!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n"), Ok(None));
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Busy\r\n\r\n"),
            Err("HTTP/1.1 503 Busy".to_owned())
        );
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn finds_a_users_home() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nann:x:1000:1000::/home/ann:/bin/bash\n";
        assert_eq!(home_of(passwd, 1000), Some(PathBuf::from("/home/ann")));
        assert_eq!(home_of(passwd, 7), None);
    }
}
