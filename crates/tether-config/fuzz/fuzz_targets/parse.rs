//! Any text given to the config parser yields a config or errors, never a panic; every error
//! names a position in the file, and a config it accepts survives the round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match tether_config::parse(text, "fuzz.yaml") {
        Ok(config) => {
            let again = tether_config::parse(&tether_config::to_yaml(&config), "again.yaml");
            assert_eq!(
                again.ok().as_ref(),
                Some(&config),
                "round trip changed the config"
            );
        }
        Err(errors) => assert!(!errors.0.is_empty()),
    }
});
