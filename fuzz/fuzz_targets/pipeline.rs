//! Any bytes given to the pipeline parser: no panic, no hang, and every error has a position.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match flotilla_core::pipeline::parse("fuzz.yaml", text) {
        Ok(p) => {
            // A valid pipeline must also be consistent: stages cover every job once.
            let staged: usize = p.stages().iter().map(Vec::len).sum();
            assert_eq!(staged, p.jobs.len());
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in diags {
                assert!(d.line >= 1 && d.column >= 1 && !d.message.is_empty());
            }
        }
    }
});
