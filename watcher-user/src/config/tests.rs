//! The whole module through [`parse`] and [`load`]: a table of broken files and the line,
//! key and message each must produce, every key of a full file, the defaults, file checks.

use super::errors::{closest, edit_distance, position};
use super::*;
use std::os::unix::fs::PermissionsExt as _;

/// A scratch directory with sources to point configs at; `@D` in a config stands for it.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical tempdir");
        for sub in ["src/inner", "src2", "a/data", "b/data", "replica"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        std::fs::write(root.join("file"), b"x").expect("write");
        std::os::unix::fs::symlink(root.join("src"), root.join("link")).expect("symlink");
        Fixture { _dir: dir, root }
    }

    fn expand(&self, text: &str) -> String {
        text.replace("@D", &self.root.to_string_lossy())
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("w.toml"), &self.expand(text))
    }

    fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.root.join(name);
        std::fs::write(&path, self.expand(text)).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }
}

/// (config, line, key, message fragment); an empty key expects a syntax error with a
/// column.
const BROKEN: &[(&str, usize, &str, &str)] = &[
    (
        "[deamon]\nbackend = \"auto\"\n",
        1,
        "deamon",
        "unknown key `deamon`; did you mean `daemon`?",
    ),
    (
        "[daemon]\nbackendd = \"auto\"\n",
        2,
        "daemon.backendd",
        "did you mean `backend`?",
    ),
    (
        "[daemon]\nbackend = \"bpf\"\n",
        2,
        "daemon.backend",
        "unknown backend \"bpf\", expected \"auto\", \"fanotify\", \"inotify\" or \"ebpf\"",
    ),
    (
        "[daemon]\nebpf_probes = \"fentry\"\n",
        2,
        "daemon.ebpf_probes",
        "unknown probe set \"fentry\", expected \"auto\", \"vfs\" or \"syscalls\"",
    ),
    (
        "[daemon]\nebpf_ringbuf_bytes = 4096\n",
        2,
        "daemon.ebpf_ringbuf_bytes",
        "must be at least 16384, got 4096",
    ),
    (
        "[daemon]\nebpf_ringbuf_bytes = 4294967296\n",
        2,
        "daemon.ebpf_ringbuf_bytes",
        "must be at most 1073741824 (1 GiB), got 4294967296",
    ),
    (
        "[daemon]\nebpf_kernel_filter = \"yes\"\n",
        2,
        "daemon.ebpf_kernel_filter",
        "expected true or false, got string \"yes\"",
    ),
    (
        "[daemon]\nstate_dir = \"var/lib/watcher\"\n",
        2,
        "daemon.state_dir",
        "\"var/lib/watcher\" is not an absolute path",
    ),
    (
        "[daemon]\nmetrics = \"0.0.0.0:9469\"\n",
        2,
        "daemon.metrics",
        "0.0.0.0:9469 is not a loopback address",
    ),
    (
        "[daemon]\n\nmetrics = \"localhost:9469\"\n",
        3,
        "daemon.metrics",
        "\"localhost:9469\" is not an address and port",
    ),
    (
        "[daemon]\nrsync = \"bin/rsync\"\n",
        2,
        "daemon.rsync",
        "must be a program name looked up in PATH or an absolute path",
    ),
    ("", 1, "sync", "no [[sync]] groups"),
    (
        "[[sync]]\nsource = \"@D/src\"\nexcludes = [\"*.swp\"]\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].excludes",
        "unknown key `excludes`; did you mean `exclude`?",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\ncolour = \"red\"\n",
        3,
        "sync[0].colour",
        "unknown key `colour`; known keys: name, source, include, exclude",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.targets]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].targets",
        "did you mean `target`?",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\npasword_file = \"/p\"\n",
        5,
        "sync[0].target[0].pasword_file",
        "did you mean `password_file`?",
    ),
    (
        "[sync]\nsource = \"@D/src\"\n",
        1,
        "sync",
        "expected an array, got table",
    ),
    (
        "[[sync]]\nname = \"x\"\n[[sync.target]]\ndest = \"@D/replica\"\n",
        1,
        "sync[0].source",
        "required key is missing",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\nname = \"r\"\n",
        3,
        "sync[0].target[0].dest",
        "required key is missing",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\ndelay_ms = -5\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].delay_ms",
        "expected a non-negative integer, got -5",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n\ndelay_ms = \"fast\"\n",
        4,
        "sync[0].delay_ms",
        "expected milliseconds or a duration such as \"100ms\" or \"1s\", got \"fast\"",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nmax_batch = 1.5\n",
        3,
        "sync[0].max_batch",
        "expected a non-negative integer, got floating point `1.5`",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nhard_links = \"yes\"\n",
        3,
        "sync[0].hard_links",
        "expected true or false, got string \"yes\"",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nmax_delay_ms = 50\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].max_delay_ms",
        "max_delay_ms (50) is less than delay_ms (100)",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\ndelay_ms = 5000\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].delay_ms",
        "delay_ms (5000) exceeds max_delay_ms (1000, the default)",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nmax_batch = 0\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].max_batch",
        "must be at least 1, got 0",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nverify_interval = \"6 parsecs\"\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].verify_interval",
        "invalid duration \"6 parsecs\"",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nverify_interval = \"0s\"\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].verify_interval",
        "must be longer than zero",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nexclude = [\"*.swp\", \"\"]\n[[sync.target]]\ndest = \"@D/replica\"\n",
        3,
        "sync[0].exclude[1]",
        "empty exclude pattern",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nexclude = [\n  \"*.swp\",\n  7,\n]\n",
        5,
        "sync[0].exclude[1]",
        "expected a string, got integer `7`",
    ),
    (
        "[[daemon]]\nbackend = \"auto\"\n",
        1,
        "daemon",
        "expected a table, got array",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nverify_interval = 1979-05-27\n",
        3,
        "sync[0].verify_interval",
        "expected a string, got datetime `1979-05-27`",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nmax_backlog = 0x10000000000000000\n",
        5,
        "sync[0].target[0].max_backlog",
        "out of range",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nexclude = [\n  \"*.swp\",\n  \"*.[ch\",\n]\n[[sync.target]]\ndest = \"@D/replica\"\n",
        5,
        "sync[0].exclude[1]",
        "invalid exclude pattern \"*.[ch\": unclosed character class",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nrsync_args = [\n  \"--numeric-ids\",\n  \"/etc\",\n]\n[[sync.target]]\ndest = \"@D/replica\"\n",
        5,
        "sync[0].rsync_args[1]",
        "\"/etc\" is not an rsync option",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nrsync_args = [\"--password-file=/p\"]\n",
        5,
        "sync[0].target[0].rsync_args[0]",
        "password_file key",
    ),
    (
        "[[sync]]\nsource = \"src\"\n",
        2,
        "sync[0].source",
        "source \"src\" is not an absolute path",
    ),
    (
        "[[sync]]\nsource = \"@D/nope\"\n",
        2,
        "sync[0].source",
        "source @D/nope does not exist",
    ),
    (
        "[[sync]]\nsource = \"@D/file\"\n",
        2,
        "sync[0].source",
        "source @D/file is not a directory",
    ),
    (
        "[[sync]]\nname = \"a/b\"\nsource = \"@D/src\"\n",
        2,
        "sync[0].name",
        "may not be \".\", \"..\" or contain '/'",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n",
        1,
        "sync[0].target",
        "no targets",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"\"\n",
        4,
        "sync[0].target[0].dest",
        "dest is empty",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"--delete\"\n",
        4,
        "sync[0].target[0].dest",
        "would be read as an rsync option",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"replica\"\n",
        4,
        "sync[0].target[0].dest",
        "local dest \"replica\" is not an absolute path",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/file\"\n",
        4,
        "sync[0].target[0].dest",
        "exists and is not a directory",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/src/new/replica\"\n",
        4,
        "sync[0].target[0].dest",
        "target @D/src/new/replica lies inside source @D/src",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/link/replica\"\n",
        4,
        "sync[0].target[0].dest",
        "target @D/src/replica lies inside source @D/src",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/src2/../replica/..\"\n",
        4,
        "sync[0].target[0].dest",
        "source @D/src lies inside target @D:",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/replica\"\npassword_file = \"/p\"\n",
        5,
        "sync[0].target[0].password_file",
        "password_file is only for rsync daemon targets (host::module or rsync://...), and @D/replica is a local directory",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"host:/srv/x\"\npassword_file = \"/p\"\n",
        5,
        "sync[0].target[0].password_file",
        "host:/srv/x goes over ssh",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"rsync://h/m\"\npassword_file = \"p\"\n",
        5,
        "sync[0].target[0].password_file",
        "\"p\" is not an absolute path",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nmax_backlog = 0\n",
        5,
        "sync[0].target[0].max_backlog",
        "must be at least 1, got 0",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync.target]]\ndest = \"h::m\"\n",
        6,
        "sync[0].target[1].dest",
        "target name \"h::m\" is already used by sync[0].target[0]; a target's name defaults to its dest",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\nname = \"t\"\ndest = \"h::m\"\n[[sync.target]]\nname = \"t\"\ndest = \"h::n\"\n",
        7,
        "sync[0].target[1].name",
        "target name \"t\" is already used by sync[0].target[0]",
    ),
    (
        "[[sync]]\nname = \"x\"\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n\n[[sync]]\nname = \"x\"\nsource = \"@D/src2\"\n[[sync.target]]\ndest = \"h::n\"\n",
        8,
        "sync[1].name",
        "group name \"x\" is already used by sync[0] (line 1)",
    ),
    (
        "[[sync]]\nsource = \"@D/a/data\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/b/data\"\n[[sync.target]]\ndest = \"h::n\"\n",
        6,
        "sync[1].source",
        "group name \"data\", taken from the source's last component, is already used by sync[0] (line 1); set a distinct `name`",
    ),
    (
        "[[sync]]\nname = \"a\"\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nname = \"b\"\nsource = \"@D/link\"\n[[sync.target]]\ndest = \"h::n\"\n",
        8,
        "sync[1].source",
        "@D/src is also the source of sync[0]",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/src/inner\"\n[[sync.target]]\ndest = \"h::n\"\n",
        6,
        "sync[1].source",
        "@D/src/inner lies inside the source of sync[0] (@D/src)",
    ),
    (
        "[[sync]]\nsource = \"@D/src/inner\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::n\"\n",
        6,
        "sync[1].source",
        "@D/src contains the source of sync[0] (@D/src/inner)",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/src2\"\n[[sync.target]]\ndest = \"@D/src/copy\"\n",
        8,
        "sync[1].target[0].dest",
        "target @D/src/copy lies inside source @D/src: the daemon would copy its own copies (sync[0])",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/replica\"\n[[sync]]\nsource = \"@D/src2\"\n[[sync.target]]\ndest = \"@D/replica/two\"\n",
        8,
        "sync[1].target[0].dest",
        "overlaps sync[0].target[0].dest (@D/replica)",
    ),
    // A check that needs a bad key's value stays quiet: no group name is taken from a
    // bad source, no dest is compared with it, and a bad dest's kind is not judged.
    (
        "[[sync]]\nsource = \"@D/nope\"\n[[sync.target]]\ndest = \"@D/nope/replica\"\n",
        2,
        "sync[0].source",
        "source @D/nope does not exist",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"replica\"\npassword_file = \"/p\"\nssh = [\"ssh\"]\n",
        4,
        "sync[0].target[0].dest",
        "local dest \"replica\" is not an absolute path",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\ndelay_ms = -5\nmax_delay_ms = 50\n[[sync.target]]\ndest = \"h::m\"\n",
        3,
        "sync[0].delay_ms",
        "expected a non-negative integer, got -5",
    ),
    (
        "[[sync]]\nname = \"x\nsource = \"@D/src\"\n",
        2,
        "",
        "w.toml:2:10: ",
    ),
    (
        "[[sync]]\nsource = \"@D/src\"\nsource = \"@D/src2\"\n",
        3,
        "",
        "w.toml:3:1: sync[0].source: duplicate key",
    ),
    (
        "[daemon]\nrsync = \"rsync\"\n\n[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n  dest = \"h::n\"\n",
        8,
        "",
        "w.toml:8:3: sync[0].target[0].dest: duplicate key",
    ),
];

#[test]
fn broken_configs_name_line_and_key() {
    let fx = Fixture::new();
    assert!(BROKEN.len() >= 15);
    for (text, line, key, fragment) in BROKEN {
        let err = match fx.parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        let message = err.to_string();
        let fragment = fx.expand(fragment);
        let place = if key.is_empty() {
            format!("w.toml:{line}:")
        } else {
            format!("w.toml:{line}: {key}: ")
        };
        // The row's error is one of the lines; the only others a row may add are for a
        // file left without groups or a group left without targets.
        let errors = match err {
            ConfigError::Several(errors) => errors,
            err => vec![err],
        };
        let (mine, others): (Vec<_>, Vec<_>) = errors
            .iter()
            .partition(|e| e.to_string().starts_with(&place));
        let [err] = mine[..] else {
            panic!("{message:?} should have one line starting with {place:?}\n{text}");
        };
        for other in others {
            let other = other.to_string();
            assert!(
                other.contains("no [[sync]] groups") || other.contains("no targets"),
                "{message:?}: unexpected {other:?}\n{text}"
            );
        }
        assert!(
            err.to_string().contains(&fragment),
            "{message:?} should contain {fragment:?}\n{text}"
        );
        match err {
            ConfigError::Invalid {
                line: l,
                column,
                key: k,
                ..
            } => {
                assert_eq!(l, line, "{message}");
                assert_eq!(column.is_some(), key.is_empty(), "{message}");
                if !key.is_empty() {
                    assert_eq!(k, key, "{message}");
                }
            }
            other => panic!("not an Invalid error: {other:?}"),
        }
    }
}

/// An error expected on a line of its own: its line, key and a fragment of its message.
type Expected = (usize, &'static str, &'static str);

/// (config, every error it must produce, in order). Each file has several errors in one
/// table, which are all reported, one line each.
const SEVERAL: &[(&str, &[Expected])] = &[
    // Keys the schema cannot read (unknown, of the wrong type, a bad duration) in every
    // table, beside values that fail their checks: all of them, in file order.
    (
        "[daemon]
log_level = \"debug\"
max_processes = 0

[[sync]]
source = \"src\"
delay_ms = \"soon\"
hard_links = \"yes\"
exclude = [\"a[\", 7]

[[sync.target]]
dset = \"/r\"
dest = \"@D/dst\"
max_backlog = -1
",
        &[
            (2, "daemon.log_level", "unknown key `log_level`"),
            (3, "daemon.max_processes", "must be at least 1, got 0"),
            (6, "sync[0].source", "is not an absolute path"),
            (7, "sync[0].delay_ms", "got \"soon\""),
            (8, "sync[0].hard_links", "expected true or false"),
            (9, "sync[0].exclude[1]", "expected a string"),
            (9, "sync[0].exclude[0]", "invalid exclude pattern \"a[\""),
            (12, "sync[0].target[0].dset", "did you mean `dest`?"),
            (14, "sync[0].target[0].max_backlog", "got -1"),
        ],
    ),
    // A required key of the wrong type is told once, not also as missing.
    (
        "[[sync]]
source = 5
[[sync.target]]
dest = \"/r\"
",
        &[(2, "sync[0].source", "expected a string, got integer `5`")],
    ),
    (
        "[daemon]
backend = \"bpf\"
state_dir = \"var/lib/watcher\"
metrics = \"localhost:9469\"
ebpf_ringbuf_bytes = 4096
rsync = \"bin/rsync\"
max_processes = 0
ebpf_probes = \"fentry\"
status_socket = \"status.sock\"

[[sync]]
source = \"@D/src\"
[[sync.target]]
dest = \"h::m\"
",
        &[
            (2, "daemon.backend", "unknown backend \"bpf\""),
            (
                3,
                "daemon.state_dir",
                "\"var/lib/watcher\" is not an absolute path",
            ),
            (
                4,
                "daemon.metrics",
                "\"localhost:9469\" is not an address and port",
            ),
            (
                5,
                "daemon.ebpf_ringbuf_bytes",
                "must be at least 16384, got 4096",
            ),
            (
                6,
                "daemon.rsync",
                "must be a program name looked up in PATH",
            ),
            (7, "daemon.max_processes", "must be at least 1, got 0"),
            (8, "daemon.ebpf_probes", "unknown probe set \"fentry\""),
            (
                9,
                "daemon.status_socket",
                "\"status.sock\" is not an absolute path",
            ),
        ],
    ),
    (
        "[daemon]
metrics = \"10.0.0.1:9469\"
ebpf_ringbuf_bytes = 4294967296

[[sync]]
source = \"@D/src\"
[[sync.target]]
dest = \"h::m\"
",
        &[
            (
                2,
                "daemon.metrics",
                "10.0.0.1:9469 is not a loopback address",
            ),
            (
                3,
                "daemon.ebpf_ringbuf_bytes",
                "must be at most 1073741824 (1 GiB)",
            ),
        ],
    ),
    (
        "[[sync]]
name = \"a/b\"
source = \"@D/src\"
include = [\"\", \"+ x\"]
exclude = [
  \"*.[ch\",
  \"\",
  \"ok\",
  \"*.[x\",
]
rsync_args = [\"/etc\", \"--numeric-ids\", \"--password-file=/p\"]
delay_ms = -5
max_delay_ms = 50
max_batch = 0
delete = \"sometimes\"
verify_interval = \"0s\"
[[sync.target]]
dest = \"h::m\"
",
        &[
            (2, "sync[0].name", "may not be \".\", \"..\" or contain '/'"),
            (4, "sync[0].include[0]", "empty include pattern"),
            (4, "sync[0].include[1]", "plain pattern"),
            (6, "sync[0].exclude[0]", "invalid exclude pattern \"*.[ch\""),
            (7, "sync[0].exclude[1]", "empty exclude pattern"),
            (9, "sync[0].exclude[3]", "invalid exclude pattern \"*.[x\""),
            (
                11,
                "sync[0].rsync_args[0]",
                "\"/etc\" is not an rsync option",
            ),
            (11, "sync[0].rsync_args[2]", "password_file key"),
            // max_delay_ms is not compared with a delay_ms that is no number.
            (
                12,
                "sync[0].delay_ms",
                "expected a non-negative integer, got -5",
            ),
            (14, "sync[0].max_batch", "must be at least 1, got 0"),
            (15, "sync[0].delete", "unknown value \"sometimes\""),
            (16, "sync[0].verify_interval", "must be longer than zero"),
        ],
    ),
    (
        "[[sync]]
source = \"@D/src\"
exclude_from = \"excludes\"
delay_ms = 5000
",
        &[
            (1, "sync[0].target", "no targets"),
            (
                3,
                "sync[0].exclude_from",
                "\"excludes\" is not an absolute path",
            ),
            (
                4,
                "sync[0].delay_ms",
                "delay_ms (5000) exceeds max_delay_ms (1000, the default)",
            ),
        ],
    ),
    (
        "[[sync]]
source = \"@D/src\"
[[sync.target]]
name = \"\"
dest = \"@D/replica\"
password_file = \"/p\"
rsync_args = [\"x\"]
ssh = [\"ssh\"]
max_backlog = 0
post_sync = []
",
        &[
            (4, "sync[0].target[0].name", "name is empty"),
            (
                6,
                "sync[0].target[0].password_file",
                "@D/replica is a local directory",
            ),
            (
                7,
                "sync[0].target[0].rsync_args[0]",
                "\"x\" is not an rsync option",
            ),
            (8, "sync[0].target[0].ssh", "only for ssh targets"),
            (
                9,
                "sync[0].target[0].max_backlog",
                "must be at least 1, got 0",
            ),
            (10, "sync[0].target[0].post_sync", "program first"),
        ],
    ),
    (
        "[[sync]]
source = \"@D/src\"
[[sync.target]]
dest = \"--delete\"
password_file = \"p\"
ssh = []
[[sync.target]]
dest = \"@D/src/copy\"
max_backlog = -1
",
        &[
            // A bad dest's kind is unknown: whether password_file and ssh belong is not
            // judged, but their values are.
            (
                4,
                "sync[0].target[0].dest",
                "would be read as an rsync option",
            ),
            (
                5,
                "sync[0].target[0].password_file",
                "\"p\" is not an absolute path",
            ),
            (6, "sync[0].target[0].ssh", "program first"),
            (8, "sync[0].target[1].dest", "lies inside source @D/src"),
            (
                9,
                "sync[0].target[1].max_backlog",
                "expected a non-negative integer, got -1",
            ),
        ],
    ),
];

#[test]
fn every_error_of_a_table_is_reported_in_file_order() {
    let fx = Fixture::new();
    for (text, expected) in SEVERAL {
        let message = match fx.parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        let lines: Vec<&str> = message.lines().collect();
        for (n, (line, key, fragment)) in expected.iter().enumerate() {
            let place = format!("w.toml:{line}: {key}: ");
            let fragment = fx.expand(fragment);
            assert!(
                lines
                    .get(n)
                    .is_some_and(|l| l.starts_with(&place) && l.contains(&fragment)),
                "line {} of {message:?} should be {place:?} with {fragment:?}\n{text}",
                n + 1
            );
        }
        assert_eq!(lines.len(), expected.len(), "{message}\n{text}");
    }
}

/// Values at the edge of every rule, and keys whose checks depend on others, all good: a
/// file with no error is taken as it is.
#[test]
fn an_unusual_but_good_config_passes() {
    let fx = Fixture::new();
    let config = fx
        .parse(
            "[daemon]
metrics = \"0.0.0.0:9469\"
metrics_allow_remote = true
ebpf_ringbuf_bytes = 16384
max_processes = 1
rsync = \"rsync\"

[[sync]]
source = \"@D/link/\"
include = [\"*/\"]
exclude = [\"- *.tmp\", \"+ keep\", \"!\", \"\\\\[literal]\"]
rsync_args = [\"-v\", \"--numeric-ids\"]
delay_ms = 0
max_delay_ms = 0
max_batch = 1
delete = \"startup\"
verify_interval = \"1s\"

[[sync.target]]
dest = \"rsync://h/m\"
password_file = \"/etc/watcher/h.pass\"
max_backlog = 1

[[sync.target]]
name = \"rsync://h/m2\"
dest = \"u@h:/r\"
ssh = [\"ssh\", \"-p\", \"2222\"]
post_sync = [\"/bin/true\"]
",
        )
        .expect("valid");
    assert_eq!(config.daemon.ebpf_ringbuf_bytes, 16384);
    assert_eq!(config.daemon.max_processes, Some(1));
    let group = &config.groups[0];
    // Named after the source as written, whose link resolves to src.
    assert_eq!(group.name, "link");
    assert_eq!(group.source, fx.root.join("src"));
    assert_eq!(group.flush.delay, Duration::ZERO);
    assert_eq!(group.flush.max_delay, Duration::ZERO);
    assert_eq!(group.flush.max_batch, 1);
    assert_eq!(group.verify_interval, Some(Duration::from_secs(1)));
    assert_eq!(
        group.excludes.patterns(),
        ["+ */", "- *.tmp", "+ keep", "!", "\\[literal]"]
    );
    let names: Vec<&str> = group.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["rsync://h/m", "rsync://h/m2"]);
}

const FULL: &str = r#"# every key
[daemon]
backend = "fanotify"
state_dir = "/var/lib/watcher-test"
status_socket = "/run/watcher-test/status.sock"
metrics = "[::1]:9469"
rsync = "/usr/local/bin/rsync"
ebpf_probes = "syscalls"
ebpf_ringbuf_bytes = 65536
ebpf_kernel_filter = false
max_processes = 3

[[sync]]
name = "data"
source = "@D/src/"
exclude = ["*.swp", ".cache/"]
rsync_args = ["--numeric-ids"]
hard_links = true
one_file_system = true
delay_ms = 50
max_delay_ms = 2000
max_batch = 500
initial_sync = false
verify_interval = "6h 30m"

[[sync.target]]
dest = "backup1::data"
password_file = "@D/backup1.pass"
rsync_args = ["--timeout=60"]
max_backlog = 1000
post_sync = ["/usr/local/bin/reindex", "--from0"]

[[sync.target]]
name = "replica"
dest = "@D/replica/data"

[[sync]]
source = "@D/src2"

[[sync.target]]
dest = "user@host:/srv/src2"
ssh = ["ssh", "-p", "2222", "-i", "/etc/watcher/id_ed25519"]
"#;

#[test]
fn full_config() {
    let fx = Fixture::new();
    let config = fx.parse(FULL).expect("valid");
    assert_eq!(config.path, Path::new("w.toml"));
    assert_eq!(
        config.daemon,
        DaemonConfig {
            backend: BackendKind::Fanotify,
            state_dir: "/var/lib/watcher-test".into(),
            status_socket: "/run/watcher-test/status.sock".into(),
            metrics: Some("[::1]:9469".parse().expect("addr")),
            metrics_allow_remote: false,
            rsync: "/usr/local/bin/rsync".into(),
            ebpf_probes: crate::backend::ebpf::ProbeChoice::Syscalls,
            ebpf_ringbuf_bytes: 65536,
            ebpf_kernel_filter: false,
            max_processes: Some(3),
        }
    );
    assert_eq!(config.groups.len(), 2);
    let data = &config.groups[0];
    assert_eq!(data.name, "data");
    assert_eq!(data.source, fx.root.join("src"));
    assert_eq!(data.excludes.patterns(), ["*.swp", ".cache/"]);
    assert_eq!(data.rsync_args, [OsString::from("--numeric-ids")]);
    assert!(data.hard_links);
    assert!(data.one_file_system);
    assert_eq!(data.flush.delay, Duration::from_millis(50));
    assert_eq!(data.flush.max_delay, Duration::from_secs(2));
    assert_eq!(data.flush.max_batch, 500);
    assert!(!data.initial_sync);
    assert_eq!(
        data.verify_interval,
        Some(Duration::from_secs(6 * 3600 + 1800))
    );
    let password = fx.root.join("backup1.pass");
    assert_eq!(
        data.targets,
        [
            TargetConfig {
                name: "backup1::data".into(),
                dest: Target::Remote("backup1::data".into()),
                password_file: Some(password.clone()),
                rsync_args: vec!["--timeout=60".into()],
                ssh: vec![],
                max_backlog: 1000,
                post_sync: vec!["/usr/local/bin/reindex".into(), "--from0".into()],
            },
            TargetConfig {
                name: "replica".into(),
                dest: Target::Local(fx.root.join("replica/data")),
                password_file: None,
                rsync_args: vec![],
                ssh: vec![],
                max_backlog: 1_000_000,
                post_sync: vec![],
            },
        ]
    );
    let mut password_arg = OsString::from("--password-file=");
    password_arg.push(&password);
    assert_eq!(
        data.targets[0].rsync_args(data),
        [
            OsString::from("--numeric-ids"),
            password_arg,
            OsString::from("--timeout=60")
        ]
    );
    assert_eq!(
        data.targets[1].rsync_args(data),
        [OsString::from("--numeric-ids")]
    );
    let second = &config.groups[1];
    assert_eq!(second.name, "src2");
    assert_eq!(second.targets[0].name, "user@host:/srv/src2");
}

#[test]
fn defaults() {
    let fx = Fixture::new();
    let config = fx
        .parse("[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n")
        .expect("valid");
    assert_eq!(config.daemon, DaemonConfig::default());
    assert_eq!(config.daemon.backend, BackendKind::Auto);
    assert_eq!(config.daemon.state_dir, Path::new("/var/lib/watcher"));
    assert_eq!(
        config.daemon.status_socket,
        Path::new("/run/watcher/status.sock")
    );
    assert_eq!(config.daemon.metrics, None);
    assert_eq!(config.daemon.rsync, Path::new("rsync"));
    let group = &config.groups[0];
    assert_eq!(group.name, "src");
    assert!(group.excludes.is_empty());
    assert!(group.rsync_args.is_empty());
    assert!(!group.hard_links);
    assert!(!group.one_file_system);
    let flush = FlushConfig::default();
    assert_eq!(group.flush.delay, flush.delay);
    assert_eq!(group.flush.max_delay, flush.max_delay);
    assert_eq!(group.flush.max_batch, flush.max_batch);
    assert!(group.initial_sync);
    assert_eq!(group.verify_interval, None);
    let target = &group.targets[0];
    assert_eq!(target.name, "h::m");
    assert_eq!(target.password_file, None);
    assert_eq!(target.max_backlog, 1_000_000);
    assert!(target.rsync_args(group).is_empty());
}

#[test]
fn suggestions() {
    let known = [
        "name",
        "source",
        "exclude",
        "rsync_args",
        "delay_ms",
        "target",
    ];
    assert_eq!(closest("sourc", &known), Some("source"));
    assert_eq!(closest("delay", &known), Some("delay_ms"));
    assert_eq!(closest("rsync_arg", &known), Some("rsync_args"));
    assert_eq!(closest("colour", &known), None);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("", "abc"), 3);
}

#[test]
fn positions_count_characters() {
    let text = "a = 1\nbé = \"x\"\n";
    assert_eq!(position(text, 0), (1, 1));
    assert_eq!(position(text, 6), (2, 1));
    // The byte after "bé = " is the 6th character of line 2.
    assert_eq!(position(text, text.find('"').expect("quote")), (2, 6));
}

const WITH_PASSWORD: &str = "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\npassword_file = \"@D/pass\"\n";

#[test]
fn load_refuses_a_config_another_user_could_change() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: changing a file's owner needs root");
        return;
    }
    let fx = Fixture::new();
    fx.write("pass", "secret\n", 0o600);
    let path = fx.write("theirs.toml", WITH_PASSWORD, 0o600);
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let message = load(&path)
        .expect_err("a config owned by another user")
        .to_string();
    assert!(message.contains("owned by uid 65534"), "{message}");
    std::os::unix::fs::chown(&path, Some(0), None).unwrap();
    load(&path).expect("owned by root again");

    let dir = fx.root.join("shared");
    std::fs::create_dir(&dir).unwrap();
    let inside = dir.join("w.toml");
    std::fs::write(&inside, fx.expand(WITH_PASSWORD)).unwrap();
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let message = load(&inside)
        .expect_err("a directory others can write to")
        .to_string();
    assert!(
        message.contains("writable by group or others (mode 0777)"),
        "{message}"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    load(&inside).expect("a sticky directory owned by root");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
    let message = load(&inside)
        .expect_err("a directory another user owns")
        .to_string();
    assert!(message.contains("owned by uid 65534"), "{message}");
}

#[test]
fn load_refuses_a_config_others_can_write() {
    let fx = Fixture::new();
    fx.write("pass", "secret\n", 0o600);
    for mode in [0o664, 0o646, 0o622] {
        let path = fx.write("w.toml", WITH_PASSWORD, mode);
        let err = load(&path).expect_err("writable config accepted");
        let message = err.to_string();
        assert!(
            matches!(err, ConfigError::Permissions { mode: m, .. } if m == mode),
            "{message}"
        );
        assert!(message.contains(&format!("{mode:04o}")), "{message}");
        assert!(
            message.contains(&format!("chmod 600 {}", path.display())),
            "{message}"
        );
    }
    for mode in [0o600, 0o644, 0o400] {
        let path = fx.write("w.toml", WITH_PASSWORD, mode);
        let config = load(&path).expect("config");
        assert_eq!(config.path, path);
    }
}

#[test]
fn load_checks_password_files() {
    let fx = Fixture::new();
    let config = fx.write("w.toml", WITH_PASSWORD, 0o644);
    let pass = fx.root.join("pass");

    let err = load(&config).expect_err("missing password file accepted");
    assert!(
        err.to_string().starts_with(&format!(
            "{}:5: sync[0].target[0].password_file: password file {} does not exist",
            config.display(),
            pass.display()
        )),
        "{err}"
    );

    for mode in [0o640, 0o604, 0o644, 0o660] {
        fx.write("pass", "secret\n", mode);
        let message = load(&config)
            .expect_err("accessible password file accepted")
            .to_string();
        assert!(
            message.starts_with(&format!(
                "{}:5: sync[0].target[0].password_file: password file {} is accessible by group or others (mode {mode:04o})",
                config.display(),
                pass.display()
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!("chmod 600 {}", pass.display())),
            "{message}"
        );
    }

    fx.write("pass", "secret\n", 0o600);
    let loaded = load(&config).expect("config");
    let group = &loaded.groups[0];
    let mut arg = OsString::from("--password-file=");
    arg.push(&pass);
    assert_eq!(group.targets[0].rsync_args(group), [arg]);
    // parse alone does not look at password files.
    std::fs::remove_file(&pass).expect("rm");
    assert!(parse(&config, &fx.expand(WITH_PASSWORD)).is_ok());
}

#[test]
fn load_as_root_wants_a_password_file_owned_by_root() {
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    let fx = Fixture::new();
    let config = fx.write("w.toml", WITH_PASSWORD, 0o644);
    let pass = fx.write("pass", "secret\n", 0o600);
    nix::unistd::chown(&pass, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let message = load(&config)
        .expect_err("foreign password file")
        .to_string();
    assert!(message.contains("owned by uid 65534"), "{message}");
    assert!(message.contains("chown root"), "{message}");
}

#[test]
fn load_of_a_missing_file_names_it() {
    let fx = Fixture::new();
    let path = fx.root.join("absent.toml");
    let err = load(&path).expect_err("missing file");
    assert!(matches!(err, ConfigError::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("config file {} does not exist", path.display())
    );
}

#[test]
fn load_reports_errors_against_the_file() {
    let fx = Fixture::new();
    let path = fx.write(
        "w.toml",
        "[[sync]]\nsource = \"@D/src\"\ndelay_ms = -1\n[[sync.target]]\ndest = \"h::m\"\n",
        0o644,
    );
    let message = load(&path).expect_err("bad value").to_string();
    assert_eq!(
        message,
        format!(
            "{}:3: sync[0].delay_ms: expected a non-negative integer, got -1",
            path.display()
        )
    );
}

#[test]
fn a_remote_metrics_address_is_asked_for_explicitly() {
    let fx = Fixture::new();
    let tail = "\n[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"backup1::data\"\n";
    let config = fx
        .parse(&format!(
            "[daemon]\nmetrics = \"0.0.0.0:9469\"\nmetrics_allow_remote = true\n{tail}"
        ))
        .expect("valid");
    assert_eq!(
        config.daemon.metrics,
        Some("0.0.0.0:9469".parse().expect("addr"))
    );
    assert!(config.daemon.metrics_allow_remote);
    let err = fx
        .parse(&format!(
            "[daemon]\nmetrics = \"10.0.0.1:9469\"\nmetrics_allow_remote = false\n{tail}"
        ))
        .expect_err("not loopback");
    assert!(
        err.to_string().contains("set metrics_allow_remote = true"),
        "{err}"
    );
}

#[test]
fn an_ssh_command_belongs_to_an_ssh_target() {
    let fx = Fixture::new();
    let config = fx
        .parse("[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h:/r\"\nssh = [\"ssh\", \"-p\", \"2222\"]\n")
        .expect("valid");
    assert_eq!(
        config.groups[0].targets[0].ssh,
        ["ssh", "-p", "2222"].map(std::ffi::OsString::from)
    );
    for (text, want) in [
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nssh = [\"ssh\"]\n",
            "only for ssh targets",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h:/r\"\nssh = []\n",
            "program first",
        ),
    ] {
        let err = fx.parse(text).expect_err("refused").to_string();
        assert!(
            err.contains("sync[0].target[0].ssh") && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn post_sync_is_a_command_program_first() {
    let fx = Fixture::new();
    for text in [
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/dst\"\npost_sync = []\n",
        "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/dst\"\npost_sync = [\"\"]\n",
    ] {
        let err = fx.parse(text).expect_err("refused").to_string();
        assert!(
            err.contains("sync[0].target[0].post_sync") && err.contains("program first"),
            "{err}"
        );
    }
    // A string is not a command: it would need a shell to split it.
    let err = fx
        .parse("[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/dst\"\npost_sync = \"reindex --all\"\n")
        .expect_err("refused")
        .to_string();
    assert!(err.contains("post_sync"), "{err}");
}

#[test]
fn ms_keys_take_units_too() {
    let fx = Fixture::new();
    let config = fx
        .parse(
            "[[sync]]\nsource = \"@D/src\"\ndelay_ms = \"250ms\"\nmax_delay_ms = \"2s\"\n\
             [[sync.target]]\ndest = \"h::m\"\n",
        )
        .expect("valid");
    let flush = &config.groups[0].flush;
    assert_eq!(
        (flush.delay, flush.max_delay),
        (Duration::from_millis(250), Duration::from_secs(2))
    );
}

#[test]
fn every_independent_error_is_reported() {
    let fx = Fixture::new();
    let text = "[daemon]\nbackend = \"fast\"\n\
                [[sync]]\nsource = \"@D/src\"\nmax_batch = -1\n[[sync.target]]\ndest = \"h::m\"\n\
                [[sync]]\nsource = \"@D/missing\"\n[[sync.target]]\ndest = \"h::m\"\n";
    let err = fx.parse(text).expect_err("three errors").to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with("w.toml:2: daemon.backend:"), "{err}");
    assert!(
        lines[1].starts_with("w.toml:5: sync[0].max_batch:"),
        "{err}"
    );
    assert!(lines[2].starts_with("w.toml:9: sync[1].source:"), "{err}");
}

#[test]
fn includes_come_before_the_excludes_and_are_plain_patterns() {
    let fx = Fixture::new();
    let config = fx
        .parse(
            "[[sync]]\nsource = \"@D/src\"\ninclude = [\"*/\", \"*.txt\"]\nexclude = [\"*\"]\n\
             [[sync.target]]\ndest = \"h::m\"\n",
        )
        .expect("valid");
    // What rsync gets: `+ PAT` rules first, which its --exclude reads as includes.
    assert_eq!(
        config.groups[0].excludes.patterns(),
        ["+ */", "+ *.txt", "*"]
    );
    for (pattern, want) in [
        ("", "empty include pattern"),
        ("+ x", "plain pattern"),
        ("!", "plain pattern"),
    ] {
        let text = format!(
            "[[sync]]\nsource = \"@D/src\"\ninclude = [\"ok\", {pattern:?}]\n[[sync.target]]\ndest = \"h::m\"\n"
        );
        let err = fx.parse(&text).expect_err("refused").to_string();
        assert!(
            err.contains("sync[0].include[1]") && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn every_target_table_with_an_error_is_reported() {
    let fx = Fixture::new();
    let text = "[[sync]]\nsource = \"@D/src\"\n\
                [[sync.target]]\ndest = \"relative/dir\"\n\
                [[sync.target]]\ndest = \"h::m\"\nmax_backlog = 0\n\
                [[sync.target]]\ndest = \"h::m\"\n\
                [[sync.target]]\ndest = \"h::m\"\n";
    let err = fx.parse(text).expect_err("three errors").to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains("sync[0].target[0].dest:"), "{err}");
    assert!(lines[1].contains("sync[0].target[1].max_backlog:"), "{err}");
    assert!(
        lines[2].contains("sync[0].target[3].dest:") && lines[2].contains("already used"),
        "{err}"
    );
}

#[test]
fn exclude_from_reads_a_file_of_patterns() {
    let fx = Fixture::new();
    let file = fx.root.join("excludes");
    std::fs::write(&file, "# comment\n*.swp\n\n; another\n.cache/\n").expect("write");
    let config = fx
        .parse(
            "[[sync]]\nsource = \"@D/src\"\nexclude = [\"/build\"]\nexclude_from = \"@D/excludes\"\n\
             [[sync.target]]\ndest = \"h::m\"\n",
        )
        .expect("valid");
    assert_eq!(
        config.groups[0].excludes.patterns(),
        ["/build", "*.swp", ".cache/"]
    );

    std::fs::write(&file, "ok\n\n*.[ch\n").expect("write");
    let err = fx
        .parse(
            "[[sync]]\nsource = \"@D/src\"\nexclude_from = \"@D/excludes\"\n\
             [[sync.target]]\ndest = \"h::m\"\n",
        )
        .expect_err("bad pattern")
        .to_string();
    assert!(err.starts_with("w.toml:3: sync[0].exclude_from: "), "{err}");
    assert!(err.contains("excludes line 3:"), "{err}");

    let err = fx
        .parse("[[sync]]\nsource = \"@D/src\"\nexclude_from = \"@D/nope\"\n[[sync.target]]\ndest = \"h::m\"\n")
        .expect_err("missing file")
        .to_string();
    assert!(err.contains("sync[0].exclude_from: cannot read"), "{err}");
}

#[test]
fn delete_takes_a_boolean_or_when() {
    use crate::rsync::DeleteMode;
    let fx = Fixture::new();
    let group = |value: &str| {
        fx.parse(&format!(
            "[[sync]]\nsource = \"@D/src\"\n{value}\n[[sync.target]]\ndest = \"h::m\"\n"
        ))
        .map(|c| c.groups[0].delete)
        .map_err(|e| e.to_string())
    };
    assert_eq!(group(""), Ok(DeleteMode::Always));
    assert_eq!(group("delete = true"), Ok(DeleteMode::Always));
    assert_eq!(group("delete = false"), Ok(DeleteMode::Never));
    assert_eq!(group("delete = \"startup\""), Ok(DeleteMode::Startup));
    assert_eq!(group("delete = \"running\""), Ok(DeleteMode::Running));
    let err = group("delete = \"sometimes\"").unwrap_err();
    assert!(
        err.starts_with("w.toml:3: sync[0].delete: unknown value \"sometimes\""),
        "{err}"
    );
}
