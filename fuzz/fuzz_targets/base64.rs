//! `image_base64` decoding (JSON `/process`, MQTT, remove.bg's `image_file_b64`).
//!
//! Two inputs from one: the bytes as text (anything a client could send), and the bytes as an
//! image that a client encodes as clients do (standard or URL-safe alphabet, padded or not,
//! wrapped like `base64`'s output, as a `data:` URI). Properties: never a panic; what is accepted
//! is at most the size limit and is canonical (re-encoding decodes to the same bytes); and every
//! encoding a client makes decodes to exactly the original bytes.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;
use removebgd::jobs::JobError;
use removebgd::jobs::request::{MAX_IMAGE_BYTES, decode_base64};

fn wrap(text: &str, width: usize, eol: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / width * 2);
    for (i, chunk) in text.as_bytes().chunks(width).enumerate() {
        if i > 0 {
            out.push_str(eol);
        }
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // 1. Any text.
    if let Ok(text) = std::str::from_utf8(data) {
        match decode_base64(text) {
            Ok(bytes) => {
                assert!(bytes.len() <= MAX_IMAGE_BYTES);
                assert_eq!(decode_base64(&STANDARD.encode(&bytes)).unwrap(), bytes);
            }
            Err(JobError::Invalid { code, .. }) => assert_eq!(code, "invalid_base64"),
            Err(JobError::TooLarge(_)) => {}
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
    }

    // 2. The bytes as an image, encoded the way one client or another does.
    let Some((&mode, image)) = data.split_first() else {
        return;
    };
    let encoded = match mode % 4 {
        0 => STANDARD.encode(image),
        1 => STANDARD_NO_PAD.encode(image),
        2 => URL_SAFE.encode(image),
        _ => URL_SAFE_NO_PAD.encode(image),
    };
    let text = match (mode / 4) % 5 {
        0 => encoded,
        1 => wrap(&encoded, 76, "\n"),   // `base64` (GNU coreutils) output
        2 => wrap(&encoded, 64, "\r\n"), // PEM / MIME style
        3 => format!("data:image/png;base64,{encoded}"),
        _ => format!("  {}\n", wrap(&encoded, 60, "\n")),
    };
    match decode_base64(&text) {
        Ok(bytes) => assert!(bytes == image, "mode {mode}: decoded bytes differ"),
        Err(e) => panic!(
            "mode {mode}: a client's encoding of {} bytes was refused: {e}",
            image.len()
        ),
    }
});
