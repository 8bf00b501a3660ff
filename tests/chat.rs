//! Chat templates render and tokenize exactly as transformers' `apply_chat_template`
//! (references: tests/fixtures/chat.json, from tests/fixtures/make_chat_fixtures.py).

use serde::Deserialize;
use vibee_core::io::tokenizer::{ChatMessage, Tokenizer};
use vibee_tests::fixture;

#[derive(Deserialize)]
struct Case {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[test]
fn chat_template_matches_transformers() {
    let text =
        std::fs::read_to_string(vibee_tests::repo_root().join("tests/fixtures/chat.json")).unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    let tokenizer = Tokenizer::from_dir(&fixture("llama-gqa"), Some(1)).unwrap();
    for case in &reference.cases {
        let rendered = tokenizer
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered, case.text);
        assert_eq!(
            tokenizer
                .encode_chat(&case.messages, case.add_generation_prompt)
                .unwrap(),
            case.ids
        );
    }
}

#[test]
fn a_model_without_a_chat_template_says_so() {
    let dir = vibee_tests::scratch_copy("llama-gqa");
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>"}"#,
    )
    .unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path(), Some(1)).unwrap();
    let message = ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    };
    let err = tokenizer
        .apply_chat_template(&[message], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat_template"), "{err}");
}
