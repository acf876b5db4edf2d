//! Counts in messages read by people: "1 path", "2 paths", never "path(s)".

/// `n` and the noun, singular for exactly one: `counted(1, "path", "paths")` is "1 path".
pub fn counted(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_is_singular_and_the_rest_plural() {
        assert_eq!(counted(0u64, "path", "paths"), "0 paths");
        assert_eq!(counted(1u64, "path", "paths"), "1 path");
        assert_eq!(counted(2u32, "directory", "directories"), "2 directories");
    }
}
