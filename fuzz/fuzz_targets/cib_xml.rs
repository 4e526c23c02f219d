//! `cib::import` converts a Pacemaker CIB or returns an error on any text; it never
//! panics, and whatever it accepts is a valid configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(imp) = haven_model::cib::import("fuzz.xml", text)
    {
        assert!(imp.config.validate("imported").is_ok());
    }
});
