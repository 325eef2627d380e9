//! Prints each thread class's rules: the allowed system calls (those with
//! argument checks marked with how many alternatives) and the refused ones.
//!
//! ```sh
//! cargo run -q -p vmm-sandbox --example rules
//! ```

use vmm_sandbox::{names, rules, Allowed, ThreadClass};

fn main() {
    for class in ThreadClass::ALL {
        let r = rules(class);
        let checked = r.iter().filter(|(_, a)| matches!(a, Allowed::When(_))).count();
        println!(
            "{class}: {} system calls ({checked} with argument checks), {} refused",
            r.len(),
            r.refused().count()
        );
        let list: Vec<String> = r
            .iter()
            .map(|(nr, a)| {
                let name = names::name(nr).unwrap_or("?");
                match a {
                    Allowed::Always => name.to_string(),
                    Allowed::When(alts) => format!("{name}[{}]", alts.len()),
                }
            })
            .collect();
        println!("  {}", list.join(" "));
        for (nr, errno) in r.refused() {
            println!("  refused: {} -> errno {errno}", names::name(nr).unwrap_or("?"));
        }
    }
}
