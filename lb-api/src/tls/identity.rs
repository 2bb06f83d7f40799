//! Who a certificate speaks for.
//!
//! An agent's certificate names its node in one SAN URI,
//! `rpclb://node/<node-name>` ([`node_uri`]). The controller binds each stream
//! to that name: the stream's Hello must name the same node. Node names are
//! Kubernetes node names, that is DNS subdomains (RFC 1123): at most 253
//! characters of lowercase letters, digits, `-` and `.`, each dot-separated
//! part starting and ending with a letter or digit.

use std::fmt;

/// The SAN URI prefix of a node's identity.
pub const NODE_URI_PREFIX: &str = "rpclb://node/";

/// The longest node name (a DNS subdomain).
pub const MAX_NODE_NAME: usize = 253;

/// The SAN URI that names `node`.
pub fn node_uri(node: &str) -> String {
    format!("{NODE_URI_PREFIX}{node}")
}

/// Why a node name is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeNameError {
    #[error("the node name is empty")]
    Empty,
    #[error("the node name is {0} characters long (at most {MAX_NODE_NAME})")]
    TooLong(usize),
    #[error(
        "the node name {0:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.'; \
         each part starts and ends with a letter or digit)"
    )]
    Charset(String),
}

/// Checks a node name (a Kubernetes node name: an RFC 1123 DNS subdomain).
pub fn validate_node_name(name: &str) -> Result<(), NodeNameError> {
    if name.is_empty() {
        return Err(NodeNameError::Empty);
    }
    if name.len() > MAX_NODE_NAME {
        return Err(NodeNameError::TooLong(name.len()));
    }
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        // Quote a bounded prefix only: the name came from a peer.
        Err(NodeNameError::Charset(name.chars().take(64).collect()))
    }
}

/// Why a certificate does not name one valid node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate has no SAN URI {NODE_URI_PREFIX}<node-name>")]
    NoNode,
    #[error("the certificate names several nodes ({0}); it must name one")]
    SeveralNodes(NodeList),
    #[error("the certificate's node: {0}")]
    BadName(#[source] NodeNameError),
}

/// Node names, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeList(pub Vec<String>);

impl fmt::Display for NodeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// The one node that the SAN URIs `uris` name.
pub fn node_of<'a>(uris: impl IntoIterator<Item = &'a str>) -> Result<String, IdentityError> {
    let nodes: Vec<String> = uris
        .into_iter()
        .filter_map(|u| u.strip_prefix(NODE_URI_PREFIX))
        .map(str::to_string)
        .collect();
    match &nodes[..] {
        [] => Err(IdentityError::NoNode),
        [one] => {
            validate_node_name(one).map_err(IdentityError::BadName)?;
            Ok(one.clone())
        }
        _ => Err(IdentityError::SeveralNodes(NodeList(nodes))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_subdomains() {
        for ok in [
            "node-a",
            "a",
            "ip-10-0-0-1.eu-west-1.compute.internal",
            "0",
            &"a".repeat(253),
        ] {
            assert_eq!(validate_node_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_node_name(""), Err(NodeNameError::Empty));
        assert_eq!(
            validate_node_name(&"a".repeat(254)),
            Err(NodeNameError::TooLong(254))
        );
        for bad in [
            "Node-A", "-a", "a-", "a..b", ".a", "a.", "a_b", "a b", "a/b", "é", "a\n",
        ] {
            assert!(
                matches!(validate_node_name(bad), Err(NodeNameError::Charset(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_certificate_names_exactly_one_valid_node() {
        assert_eq!(
            node_of(["spiffe://x", "rpclb://node/node-a"]),
            Ok("node-a".into())
        );
        assert_eq!(node_of(["https://example"]), Err(IdentityError::NoNode));
        assert!(matches!(
            node_of(["rpclb://node/a", "rpclb://node/b"]),
            Err(IdentityError::SeveralNodes(_))
        ));
        assert!(matches!(
            node_of(["rpclb://node/A"]),
            Err(IdentityError::BadName(_))
        ));
        assert_eq!(node_uri("n1"), "rpclb://node/n1");
    }
}
