//! GGUF reading against llama.cpp's `gguf` Python package (`make_gguf_fixtures.py`): every
//! tensor type dequantizes block by block to what `gguf.quants.dequantize` gives, the metadata
//! reads back as written, and damaged files are refused with a reason.

use vibee_core::gguf::{Gguf, TensorType, Value};
use vibee_tests::{fixture, scratch_copy};

#[test]
fn every_tensor_type_dequantizes_as_the_gguf_package_does() {
    let file = Gguf::open(&fixture("gguf/blocks.gguf")).unwrap();
    let types = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"];
    let k_types = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"];
    for name in types.into_iter().chain(k_types) {
        let tensor = file
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let expected = file.tensor(&format!("{name}.expected")).unwrap();
        assert_eq!(expected.kind, TensorType::F32);
        assert_eq!(tensor.dims, expected.dims);
        let (got, want) = (file.dequantize(tensor), file.dequantize(expected));
        assert_eq!(got.len(), tensor.elements());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn metadata_reads_back_as_written() {
    let file = Gguf::open(&fixture("gguf/blocks.gguf")).unwrap();
    let get = |key: &str| file.metadata.get(key).cloned();
    assert_eq!(file.version, 3);
    assert_eq!(
        get("general.architecture"),
        Some(Value::String("llama".into()))
    );
    assert_eq!(get("vibee.u32"), Some(Value::U32(7)));
    assert_eq!(get("vibee.i32"), Some(Value::I32(-3)));
    assert_eq!(get("vibee.f32"), Some(Value::F32(0.5)));
    assert_eq!(get("vibee.bool"), Some(Value::Bool(true)));
    assert_eq!(get("vibee.string"), Some(Value::String("héllo".into())));
    assert_eq!(get("vibee.u64"), Some(Value::U64(1 << 40)));
    assert_eq!(
        get("vibee.strings"),
        Some(Value::Array(vec![
            Value::String("a".into()),
            Value::String("bc".into())
        ]))
    );
    let Some(Value::Array(ints)) = get("vibee.ints") else {
        panic!("vibee.ints is not an array");
    };
    assert_eq!(ints.len(), 3);
}

#[test]
fn damaged_files_are_refused_with_a_reason() {
    let dir = scratch_copy("gguf");
    let path = dir.path().join("blocks.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let error = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        format!("{:#}", Gguf::open(&path).err().expect("refused"))
    };
    let truncated = error(&bytes[..bytes.len() - 100]);
    assert!(
        truncated.contains("past the end of the file"),
        "{truncated}"
    );
    let header = error(&bytes[..40]);
    assert!(header.contains("inside its header"), "{header}");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(error(&magic).contains("GGUF magic"));
    let mut version = bytes.clone();
    version[4] = 9;
    assert!(error(&version).contains("version 9"));
}
