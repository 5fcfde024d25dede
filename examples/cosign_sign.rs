//! A stand-in for `cosign generate-key-pair` and `cosign sign --key` for the README walkthrough
//! on machines without cosign. It signs with the sigstore crate, not with pullgate's code, and
//! writes cosign's formats: an encrypted `cosign.key`, a PEM `cosign.pub`, and a simple-signing
//! signature pushed to the image's `sha256-<hex>.sig` tag.
//!
//! ```sh
//! COSIGN_PASSWORD=demo cargo run --example cosign_sign -- generate-key-pair ./keys
//! COSIGN_PASSWORD=demo cargo run --example cosign_sign -- sign ./keys/cosign.key 127.0.0.1:5000/demo:v1
//! ```
//! Plain HTTP is used for loopback registries only.

use sigstore::cosign::constraint::{Constraint as _, PrivateKeySigner};
use sigstore::cosign::{ClientBuilder, CosignCapabilities as _, SignatureLayer};
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::SigningScheme;
use sigstore::registry::{Auth, ClientConfig, ClientProtocol, OciReference};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let password = std::env::var("COSIGN_PASSWORD").unwrap_or_default();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["generate-key-pair", dir] => {
            let signer = SigningScheme::ECDSA_P256_SHA256_ASN1.create_signer()?;
            let pair = signer.to_sigstore_keypair()?;
            std::fs::create_dir_all(dir)?;
            let key = format!("{dir}/cosign.key");
            std::fs::write(
                &key,
                pair.private_key_to_encrypted_pem(password.as_bytes())?
                    .as_bytes(),
            )?;
            std::fs::write(format!("{dir}/cosign.pub"), pair.public_key_to_pem()?)?;
            println!("Private key written to {key}\nPublic key written to {dir}/cosign.pub");
        }
        ["sign", key, image] => {
            let pem = std::fs::read(key)?;
            let signer = SigStoreKeyPair::from_encrypted_pem(&pem, password.as_bytes())?
                .to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1)?;
            let (registry, rest) = image.split_once('/').ok_or("image must be HOST/REPO:TAG")?;
            let (repo, tag) = rest.rsplit_once(':').ok_or("image must be HOST/REPO:TAG")?;
            let protocol = if registry.starts_with("127.") || registry.starts_with("localhost") {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            };
            let config = ClientConfig {
                protocol: protocol.clone(),
                ..Default::default()
            };
            let oci = oci_client::Client::new(oci_client::client::ClientConfig {
                protocol: match protocol {
                    ClientProtocol::Http => oci_client::client::ClientProtocol::Http,
                    _ => oci_client::client::ClientProtocol::Https,
                },
                ..Default::default()
            });
            let reference =
                oci_client::Reference::with_tag(registry.into(), repo.into(), tag.into());
            let digest = oci
                .fetch_manifest_digest(&reference, &oci_client::secrets::RegistryAuth::Anonymous)
                .await?;
            let mut layer =
                SignatureLayer::new_unsigned(&format!("{registry}/{repo}").parse()?, &digest)?;
            // cosign writes the bare repository as the docker-reference.
            layer.simple_signing.critical.identity.docker_reference = format!("{registry}/{repo}");
            PrivateKeySigner::new_with_signer(signer).add_constraint(&mut layer)?;
            let sig_tag = format!("{}.sig", digest.replace(':', "-"));
            let target = OciReference::with_tag(registry.into(), repo.into(), sig_tag);
            let mut client = ClientBuilder::default()
                .with_oci_client_config(config)
                .build()?;
            client
                .push_signature(None, &Auth::Anonymous, &target, vec![layer])
                .await?;
            println!("Signed {registry}/{repo}@{digest}");
        }
        _ => {
            eprintln!("usage: cosign_sign generate-key-pair DIR | sign KEY HOST/REPO:TAG (password in COSIGN_PASSWORD)");
            std::process::exit(2);
        }
    }
    Ok(())
}
