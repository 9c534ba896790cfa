//! The README's libvirt domain (a `vhostuser` standby and a hostdev primary
//! paired by `<teaming>`) checked against libvirt's own domain schema with
//! `virt-xml-validate` (Debian's `libvirt-clients`, which runs `xmllint` from
//! `libxml2-utils`). The XML is taken from the README itself, so the example
//! users copy is the one checked, with the `mode='client'` variant the README
//! describes in words. No libvirtd runs here: this checks the document, not a
//! started guest.
//!
//! Without `virt-xml-validate` or `xmllint` the test prints why and passes,
//! except under `CI=true`, where it fails (`.ci/run` installs both).

use std::path::{Path, PathBuf};
use std::process::Command;

const README: &str = include_str!("../../../README.md");

/// The first fenced ```xml block of the README that declares a `vhostuser`
/// interface.
fn readme_domain() -> &'static str {
    let mut rest = README;
    while let Some(start) = rest.find("```xml\n") {
        let body = &rest[start + "```xml\n".len()..];
        let end = body
            .find("\n```")
            .expect("the README's ```xml block is closed");
        let block = &body[..=end];
        if block.contains("<interface type='vhostuser'>") {
            return block;
        }
        rest = &body[end..];
    }
    panic!("the README has no ```xml block with <interface type='vhostuser'>");
}

/// The value of `attr='...'` in the first element of `xml` that starts with
/// `element`.
fn attribute<'a>(xml: &'a str, element: &str, attr: &str) -> &'a str {
    let at = xml
        .find(element)
        .unwrap_or_else(|| panic!("no {element} in:\n{xml}"));
    let tag = &xml[at..at + xml[at..].find('>').unwrap()];
    let key = format!("{attr}='");
    let v = tag
        .find(&key)
        .unwrap_or_else(|| panic!("{tag}> has no {attr}="));
    let v = &tag[v + key.len()..];
    &v[..v.find('\'').unwrap()]
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// `virt-xml-validate`, or `None` (skip) when it or `xmllint` is missing.
fn validator() -> Option<PathBuf> {
    let missing = |what: &str| {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "CI=true but {what}: apt-get install libvirt-clients libxml2-utils (.ci/run does)"
            );
        }
        eprintln!(
            "skipping the libvirt schema check: {what} (apt-get install libvirt-clients libxml2-utils)"
        );
        None
    };
    let Some(v) = on_path("virt-xml-validate") else {
        return missing("virt-xml-validate is missing");
    };
    if on_path("xmllint").is_none() {
        return missing("xmllint (which virt-xml-validate runs) is missing");
    }
    Some(v)
}

/// Runs `virt-xml-validate FILE domain`; `Ok` with its output when it
/// validates, `Err` with its output when not.
fn validate(tool: &Path, name: &str, xml: &str) -> Result<String, String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libvirt");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, xml).unwrap();
    let out = Command::new(tool)
        .arg(&file)
        .arg("domain")
        .output()
        .expect("run virt-xml-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// What the example must say for QEMU's failover with our daemon, whatever
/// the schema allows: shared memory, the standby and the primary paired by
/// alias and MAC, and the daemon's command line on the same socket.
#[test]
fn readme_domain_pairs_the_vhostuser_standby_with_the_primary() {
    let xml = readme_domain();
    assert!(xml.trim_start().starts_with("<domain "), "{xml}");
    assert_eq!(attribute(xml, "<source type='memfd'", "type"), "memfd");
    assert_eq!(attribute(xml, "<access ", "mode"), "shared");
    assert_eq!(attribute(xml, "<type arch=", "machine"), "q35");

    let standby = &xml[xml.find("<interface type='vhostuser'>").unwrap()..];
    let standby = &standby[..standby.find("</interface>").unwrap()];
    let alias = attribute(standby, "<alias ", "name");
    assert!(
        alias.starts_with("ua-"),
        "libvirt keeps only user aliases that start with ua-: {alias}"
    );
    assert_eq!(attribute(standby, "<teaming ", "type"), "persistent");
    assert_eq!(attribute(standby, "<model ", "type"), "virtio");
    assert_eq!(attribute(standby, "<source type='unix'", "mode"), "server");
    let socket = attribute(standby, "<source type='unix'", "path");
    let mac = attribute(standby, "<mac ", "address");

    let primary = &xml[xml.find("<interface type='hostdev'").unwrap()..];
    let primary = &primary[..primary.find("</interface>").unwrap()];
    assert_eq!(attribute(primary, "<teaming ", "type"), "transient");
    assert_eq!(attribute(primary, "<teaming ", "persistent"), alias);
    assert_eq!(attribute(primary, "<mac ", "address"), mac);

    // libvirt's mode='server' is QEMU listening: the daemon the README starts
    // beside it connects (--client) to the same socket, with the same MAC.
    let after = &README[README.find(xml).unwrap() + xml.len()..];
    let daemon = after
        .lines()
        .find(|l| l.starts_with("vhost-user-net "))
        .expect("a vhost-user-net command line after the XML");
    assert!(daemon.contains("--client"), "{daemon}");
    assert!(daemon.contains(&format!("-s {socket} ")), "{daemon}");
    assert!(daemon.contains(&format!("--mac {mac}")), "{daemon}");
}

#[test]
fn readme_domain_validates_against_libvirts_schema() {
    let Some(tool) = validator() else { return };
    let xml = readme_domain();
    if let Err(e) = validate(&tool, "readme.xml", xml) {
        panic!("the README's libvirt domain does not validate:\n{e}\n{xml}");
    }
    // The variant the README describes in words: libvirt connects and the
    // daemon listens, with QEMU reconnecting.
    let server = "mode='server'/>";
    assert!(xml.contains(server), "{xml}");
    let client = xml.replacen(
        server,
        "mode='client'><reconnect enabled='yes' timeout='1'/></source>",
        1,
    );
    if let Err(e) = validate(&tool, "readme-client.xml", &client) {
        panic!("the README's mode='client' variant does not validate:\n{e}\n{client}");
    }
}

/// The validator does reject: a `<teaming>` of a type libvirt does not know,
/// and a transient member without the alias it pairs with.
#[test]
fn libvirts_schema_rejects_a_broken_teaming() {
    let Some(tool) = validator() else { return };
    let xml = readme_domain();
    let bogus = xml.replacen(
        "<teaming type='persistent'/>",
        "<teaming type='standby'/>",
        1,
    );
    assert_ne!(bogus, xml);
    assert!(validate(&tool, "bogus-type.xml", &bogus).is_err());
    let unpaired = xml.replacen(
        "<teaming type='transient' persistent='ua-net1'/>",
        "<teaming type='transient' persistent=''/>",
        1,
    );
    assert_ne!(unpaired, xml);
    assert!(validate(&tool, "unpaired.xml", &unpaired).is_err());
}
