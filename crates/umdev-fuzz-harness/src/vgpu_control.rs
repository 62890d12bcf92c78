//! Lines to the vGPU parent's control socket: any bytes parse into a request
//! or an error (never a panic); a request survives a round trip through its
//! own encoding, and every answer is one line of JSON.

use umdev_vgpu::parent::control::{parse_request, Request, Response};

pub fn run(data: &[u8]) {
    let answer = match parse_request(data) {
        Ok(request) => {
            let again = serde_json::to_vec(&request).expect("a request encodes");
            assert_eq!(parse_request(&again).ok(), Some(request.clone()));
            match request {
                Request::Types {} | Request::List {} => Response::Done,
                other => Response::error(format!("{other:?}")),
            }
        }
        Err(e) => Response::error(e),
    };
    let line = answer.to_line();
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    assert!(serde_json::from_slice::<serde_json::Value>(&line).is_ok());
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("types", br#"{"cmd":"types"}"#.to_vec()),
        (
            "create",
            br#"{"cmd":"create","type":"vgpu-16m","uuid":"0b8f2a54-1c3d-4e5f-8a9b-0c1d2e3f4a5b","weight":3,"persist":true}"#.to_vec(),
        ),
        ("list", br#"{"cmd":"list"}"#.to_vec()),
        ("remove", br#"{"cmd":"remove","uuid":"x","force":true}"#.to_vec()),
        ("set-weight", br#"{"cmd":"set-weight","uuid":"x","weight":9}"#.to_vec()),
    ]
}
