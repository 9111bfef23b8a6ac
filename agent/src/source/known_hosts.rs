//! Matching an SSH server's host key against an OpenSSH `known_hosts` file.
//!
//! libgit2 would only consult `~/.ssh/known_hosts` of whoever runs the agent; in a
//! cluster the trusted keys come from the git Secret instead, so the agent does the
//! lookup itself.
//!
//! Supported: plain host names, `[host]:port` for ports other than 22, comma-separated
//! pattern lists and hashed `|1|salt|hash` entries (what `ssh-keyscan -H` writes).
//! Not supported: wildcards (`*`, `?`), negated patterns (`!host`) and the
//! `@cert-authority` / `@revoked` markers. Such patterns and lines never match, so an
//! unsupported entry can only make the check stricter, never let an unknown key in.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The name a host has in `known_hosts`: OpenSSH writes the bare host for the default
/// port and `[host]:port` otherwise, so a key trusted on one port is not trusted on
/// another.
pub fn host_entry_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 { host } else { format!("[{host}]:{port}") }
}

/// Whether `known_hosts` (the file's text) lists `key` (the key blob in SSH wire
/// format, as the server sent it) for the host named `entry_name`.
///
/// Comparing whole blobs also compares the key type, which the blob starts with.
pub fn is_known(known_hosts: &str, entry_name: &str, key: &[u8]) -> bool {
    known_hosts.lines().filter_map(Entry::parse).any(|entry| entry.key == key && entry.names_host(entry_name))
}

/// One usable line of a `known_hosts` file.
struct Entry<'a> {
    patterns: &'a str,
    key: Vec<u8>,
}

impl<'a> Entry<'a> {
    /// `None` for comments, blank lines, marker lines and lines whose key is not valid
    /// base64: none of them can vouch for a key.
    fn parse(line: &'a str) -> Option<Entry<'a>> {
        let mut fields = line.split_whitespace();
        let patterns = fields.next().filter(|p| !p.starts_with(['#', '@']))?;
        let _key_type = fields.next()?;
        let key = STANDARD.decode(fields.next()?).ok()?;
        Some(Entry { patterns, key })
    }

    fn names_host(&self, entry_name: &str) -> bool {
        self.patterns.split(',').any(|pattern| match pattern.strip_prefix("|1|") {
            Some(hashed) => hashed_pattern_matches(hashed, entry_name),
            None => pattern.eq_ignore_ascii_case(entry_name),
        })
    }
}

/// A hashed pattern is `base64(salt)|base64(HMAC-SHA1(salt, name))`: the file hides
/// which hosts it lists, so the only way to match is to hash the candidate name.
fn hashed_pattern_matches(hashed: &str, entry_name: &str) -> bool {
    let Some((salt, digest)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(digest)) = (STANDARD.decode(salt), STANDARD.decode(digest)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(entry_name.as_bytes());
    mac.verify_slice(&digest).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_B64: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIEKdzNOGkLxYH3LA/fI5jdwwrqruSD8lLUqHKh6NhoRR";
    const OTHER_KEY_B64: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIDYZ0LMhvKB1BC9RpHmPKKlAVpoCz1qWHLVvdwlujWRX";

    fn key() -> Vec<u8> {
        STANDARD.decode(KEY_B64).unwrap()
    }

    #[test]
    fn names_non_default_ports_in_brackets() {
        assert_eq!(host_entry_name("Example.COM", 22), "example.com");
        assert_eq!(host_entry_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
    }

    #[test]
    fn matches_plain_and_listed_hosts() {
        let file = format!(
            "# comment\n\nother.example ssh-ed25519 {OTHER_KEY_B64}\n\
             alias,git.example,[git.example]:2222 ssh-ed25519 {KEY_B64} comment\n"
        );
        assert!(is_known(&file, "git.example", &key()));
        assert!(is_known(&file, "[git.example]:2222", &key()));
        assert!(!is_known(&file, "[git.example]:2223", &key()));
        assert!(!is_known(&file, "other.example", &key()));
    }

    #[test]
    fn matches_hashed_hosts() {
        // What `ssh-keygen -H` made of "[127.0.0.1]:2222 ssh-ed25519 KEY_B64".
        let file = format!("|1|8+16y/3mNbpiHEvGy3fQ4CiJ//c=|W7H/oB1GCZWGT9lJ0KB/64PUn68= ssh-ed25519 {KEY_B64}\n");
        assert!(is_known(&file, "[127.0.0.1]:2222", &key()));
        assert!(!is_known(&file, "127.0.0.1", &key()));
        assert!(!is_known(&file, "[127.0.0.1]:2223", &key()));
    }

    #[test]
    fn ignores_markers_and_wildcards() {
        let file = format!("@cert-authority git.example ssh-ed25519 {KEY_B64}\n*.example ssh-ed25519 {KEY_B64}\n");
        assert!(!is_known(&file, "git.example", &key()));
        assert!(!is_known(&file, "a.example", &key()));
    }
}
