//! Exports `compute`, not agora:task's `run` nor `wasi:cli/run`: a component Agora refuses.

wit_bindgen::generate!({ world: "wrong", path: "wit" });

struct Wrong;

impl Guest for Wrong {
    fn compute(x: u32) -> u32 {
        x.wrapping_mul(2)
    }
}

export!(Wrong);
