//! FFN family (v2260–v2279).

pub mod swiglu;
