//! Developer tool: print the state imported from a CIB. `cargo run -p haven-sched --example import_state -- FILE`
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    match haven_model::cib::import(&path, &text) {
        Ok(i) => {
            println!("{}", i.state.to_json());
            for u in i.unsupported {
                println!("unsupported: {u:?}");
            }
        }
        Err(e) => println!("{e}"),
    }
}
