//! The NBD decoders (request headers, option headers, INFO/GO and meta context
//! payloads) return a value or an error on any bytes; they never panic, and a decoded
//! request says exactly what its bytes said.
#![no_main]

use haven_volume::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = proto::decode_request(data) {
        assert_eq!(data.get(8..16), Some(&r.cookie.to_be_bytes()[..]));
        assert_eq!(data.get(16..24), Some(&r.offset.to_be_bytes()[..]));
        assert_eq!(data.get(24..28), Some(&r.length.to_be_bytes()[..]));
    }
    if let Ok((_, len)) = proto::decode_option_header(data) {
        assert!(len <= proto::MAX_OPTION_LEN);
    }
    if let Ok(r) = proto::decode_info_request(data) {
        assert!(r.name.len() + 2 * r.infos.len() + 6 <= data.len());
    }
    if let Ok(r) = proto::decode_meta_context_request(data) {
        let total: usize = r.queries.iter().map(|q| q.len() + 4).sum();
        assert_eq!(r.name.len() + 8 + total, data.len());
    }
});
