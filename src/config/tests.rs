//! Unit tests of the settings: flags, variables and their checks.

use super::*;

#[test]
fn node_ids_follow_the_contract() {
    assert!(NodeId::parse("a").is_ok());
    assert!(NodeId::parse("node_1-B").is_ok());
    assert!(NodeId::parse(&"x".repeat(48)).is_ok());
    assert!(NodeId::parse(&"x".repeat(49)).is_err());
    assert!(NodeId::parse("").is_err());
    assert!(NodeId::parse("no.dots").is_err());
    assert!(NodeId::parse("spa ce").is_err());
    assert!(NodeId::parse(&uuid::Uuid::new_v4().to_string()).is_ok());
    let generated = NodeId::generate();
    assert!(NodeId::parse(generated.as_str()).is_ok());
    assert!(generated.channel().len() <= 63);
}

fn settings_from(flags: &[&str]) -> Result<Settings, ConfigError> {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let argv = ["pgrelay", "--database-url", "postgres://localhost/x"]
        .iter()
        .chain(flags);
    let flags = <Flags as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?;
    Settings::from_args(flags.serve)
}

#[test]
fn jwt_keys_come_from_pem_or_jwks_files_and_secrets_rotate() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
    for file in ["jwks.json", "rsa-public.pem"] {
        let settings = settings_from(&["--jwt-public-key", &format!("{keys}{file}")]).unwrap();
        assert!(matches!(settings.auth, Auth::Jwt { .. }), "{file}");
    }
    let error = settings_from(&["--jwt-public-key", &format!("{keys}README")])
        .err()
        .unwrap();
    assert!(error.0.contains("PGRELAY_JWT_PUBLIC_KEY"), "{error}");
    let error = settings_from(&[
        "--auth",
        "jwt",
        "--jwt-previous-secret",
        "old-secret-0123456789",
    ])
    .err()
    .unwrap();
    assert!(error.0.contains("needs PGRELAY_JWT_SECRET"), "{error}");
    let rotating = settings_from(&[
        "--jwt-secret",
        "new-secret-0123456789",
        "--jwt-previous-secret",
        "old-secret-0123456789",
    ])
    .unwrap();
    let Auth::Jwt { verifier, .. } = rotating.auth else {
        panic!("jwt")
    };
    for secret in ["new-secret-0123456789", "old-secret-0123456789"] {
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": "kim", "exp": chrono::Utc::now().timestamp() + 60}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert!(verifier.verify(&token).is_ok(), "{secret}");
    }
}

#[test]
fn each_pool_has_its_size() {
    let settings = settings_from(&["--auth", "none"]).unwrap();
    assert_eq!(
        (settings.db_pool_size, settings.db_bookkeeping_pool_size),
        (16, 4)
    );
    let settings = settings_from(&[
        "--auth",
        "none",
        "--db-pool-size",
        "8",
        "--db-bookkeeping-pool-size",
        "3",
    ])
    .unwrap();
    assert_eq!(
        (settings.db_pool_size, settings.db_bookkeeping_pool_size),
        (8, 3)
    );
    let error = settings_from(&["--auth", "none", "--db-bookkeeping-pool-size", "1"]).unwrap_err();
    assert!(
        error.0.contains("PGRELAY_DB_BOOKKEEPING_POOL_SIZE"),
        "{error}"
    );
}

#[test]
fn durations_use_the_contract_syntax() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(
        parse_duration("72h").unwrap(),
        Duration::from_secs(72 * 3600)
    );
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("soon").is_err());
}
