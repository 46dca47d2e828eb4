//! The little HTTP/1.1 the metrics endpoint speaks: a request head in, one
//! response out, then the connection closes. Pure, so that every answer is tested
//! without a socket.
//!
//! Why not hyper: a scraper sends `GET /metrics` and reads one response. Serving
//! that needs a request line and a Content-Length, not keep-alive, chunking,
//! upgrades or HTTP/2; hyper (with hyper-util and http-body-util) would add a
//! dozen crates to build for it. Prometheus, curl and promtool are happy with this.

/// The most a request head may take; longer heads are refused.
pub const MAX_HEAD: usize = 8192;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (or HEAD: the same head, no body).
    Metrics {
        head_only: bool,
    },
    /// `GET /`: a line that says where the metrics are.
    Index {
        head_only: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// The length of the request head in `buf` (through the blank line), once it is
/// all there.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
}

/// Routes a request head (the request line is all that matters).
pub fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    // A query string (`?name[]=…`) does not change the answer.
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => Route::Metrics { head_only },
        "/" => Route::Index { head_only },
        _ => Route::NotFound,
    }
}

/// A complete response: status line, headers, and the body unless `head_only`.
pub fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    out.into_bytes()
}

/// The response to `route`; `render` makes the metrics text when asked for.
pub fn answer(route: Route, content_type: &str, render: impl FnOnce() -> String) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match route {
        Route::Metrics { head_only } => response("200 OK", content_type, &render(), head_only),
        Route::Index { head_only } => response(
            "200 OK",
            TEXT,
            "leaktrace: metrics are at /metrics\n",
            head_only,
        ),
        Route::NotFound => response("404 Not Found", TEXT, "not found: try /metrics\n", false),
        Route::MethodNotAllowed => {
            response("405 Method Not Allowed", TEXT, "only GET and HEAD\n", false)
        }
        Route::BadRequest => response("400 Bad Request", TEXT, "bad request\n", false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        assert_eq!(head_len(get), Some(get.len()));
        assert_eq!(head_len(b"GET /metrics HTTP/1.1\r\nHost"), None);
        assert_eq!(route(get), Route::Metrics { head_only: false });
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(
            route(b"GET / HTTP/1.1\r\n\r\n"),
            Route::Index { head_only: false }
        );
        assert_eq!(route(b"GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = answer(Route::Metrics { head_only: false }, "text/plain", || {
            "a 1\n".into()
        });
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 4\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\na 1\n"));
        let head = String::from_utf8(answer(Route::Metrics { head_only: true }, "t", || {
            "a 1\n".into()
        }))
        .unwrap();
        assert!(head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"));
        let refused = String::from_utf8(answer(Route::MethodNotAllowed, "t", String::new)).unwrap();
        assert!(refused.starts_with("HTTP/1.1 405") && refused.contains("Allow: GET, HEAD"));
    }
}
