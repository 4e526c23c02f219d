//! `Config::from_toml` returns a configuration or an error on any text; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(cfg) = haven_model::Config::from_toml("fuzz.toml", text)
    {
        // What was accepted renders, and reads back as itself.
        if let Ok(again) = cfg.to_toml() {
            let back = haven_model::Config::from_toml("again.toml", &again);
            assert_eq!(back.as_ref().ok(), Some(&cfg), "round trip of {again}");
        }
    }
});
