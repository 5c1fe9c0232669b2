// New migration files must trigger a rebuild of `sqlx::migrate!()`.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
