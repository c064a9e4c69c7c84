//! Any text given to the expression and template parsers: no panic, no stack overflow, and
//! error offsets inside the input.
#![no_main]

use flotilla_core::pipeline::expr::{Context, Expr, Template, Value};
use libfuzzer_sys::fuzz_target;

struct Everything;

impl Context for Everything {
    fn var(&self, path: &[String]) -> Value {
        Value::Str(path.join("."))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let chars = text.chars().count();
    match Expr::parse(text) {
        Ok(e) => {
            let _ = e.eval(&Everything);
        }
        Err(err) => assert!(err.offset <= chars, "offset {} beyond {chars}", err.offset),
    }
    match Template::parse(text) {
        Ok(t) => {
            let _ = t.render(&Everything);
        }
        Err(err) => assert!(err.offset <= chars, "offset {} beyond {chars}", err.offset),
    }
});
