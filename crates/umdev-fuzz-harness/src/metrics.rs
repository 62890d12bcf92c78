//! Requests to the `--metrics` endpoint: any bytes as a request head get an
//! HTTP answer (200, 404 or 400), never a panic.

pub fn run(data: &[u8]) {
    let answer = umdev::metrics::respond(data);
    assert!(answer.starts_with(b"HTTP/1.1 "));
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "get",
            b"GET /metrics HTTP/1.1\r\nHost: localhost:9100\r\nAccept: */*\r\n\r\n".to_vec(),
        ),
        ("head", b"HEAD /metrics HTTP/1.0\n\n".to_vec()),
        ("other", b"GET /favicon.ico HTTP/1.1\r\n\r\n".to_vec()),
    ]
}
