//! `State::from_json` returns a state or an error on any text; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(st) = haven_model::State::from_json("fuzz.json", text)
    {
        let back = haven_model::State::from_json("again.json", &st.to_json());
        assert!(back.is_ok(), "a parsed state renders as a valid one");
    }
});
