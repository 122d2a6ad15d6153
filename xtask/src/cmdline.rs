//! The hypervisor's command line as xtask passes it.
//!
//! hv reads `key=value` words. xtask always adds `finish=exit`, so that hv
//! ends the emulator once its self-report is done, and then the user's words.
//! The same string goes into QEMU's `-append` and into a GRUB config file,
//! whose parser gives quotes, `$`, `;` and friends a meaning of their own: such
//! characters are rejected here rather than silently changed on the way.

use std::fmt;

/// The word that makes hv end the emulator when its report is complete.
pub const FINISH_EXIT: &str = "finish=exit";

/// Characters that GRUB's script parser would interpret inside a
/// `multiboot2` line.
const GRUB_SPECIAL: &[char] = &[
    '\'', '"', '\\', '$', ';', '&', '|', '<', '>', '{', '}', '#', '`',
];

/// A command-line word that cannot be passed through unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadWord {
    /// The offending word.
    pub word: String,
    /// The character that cannot be passed.
    pub character: char,
}

impl fmt::Display for BadWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "command-line word `{}` contains {:?}, which cannot be passed through GRUB's \
             config unchanged (hv's words are plain key=value)",
            self.word, self.character
        )
    }
}

impl std::error::Error for BadWord {}

/// Splits a user-given `--append` string into words.
pub fn split_words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// The full command line: `finish=exit` first, then the user's words, so a
/// user who really wants another `finish=` can still override it.
pub fn kernel_cmdline(extra: &[String]) -> Result<String, BadWord> {
    for word in extra {
        check_word(word)?;
    }
    let mut words = vec![FINISH_EXIT.to_owned()];
    words.extend(extra.iter().cloned());
    Ok(words.join(" "))
}

fn check_word(word: &str) -> Result<(), BadWord> {
    match word
        .chars()
        .find(|c| !c.is_ascii_graphic() || GRUB_SPECIAL.contains(c))
    {
        Some(character) => Err(BadWord {
            word: word.to_owned(),
            character,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_exit_comes_first_then_user_words() {
        let extra = split_words("  bogus_option=1   log=loud ");
        assert_eq!(
            kernel_cmdline(&extra).unwrap(),
            "finish=exit bogus_option=1 log=loud"
        );
    }

    #[test]
    fn no_extra_words_gives_finish_exit_alone() {
        assert_eq!(kernel_cmdline(&[]).unwrap(), FINISH_EXIT);
    }

    #[test]
    fn grub_special_characters_are_rejected_with_the_word_named() {
        let err = kernel_cmdline(&["path=$root".to_owned()]).unwrap_err();
        assert_eq!(err.character, '$');
        assert!(err.to_string().contains("path=$root"));
        assert!(kernel_cmdline(&["a=\"b\"".to_owned()]).is_err());
        assert!(kernel_cmdline(&["a=é".to_owned()]).is_err());
    }

    #[test]
    fn ordinary_punctuation_is_accepted() {
        assert!(kernel_cmdline(&["mem=0x1000,2M:ok/-+.".to_owned()]).is_ok());
    }
}
