fn main() -> std::process::ExitCode {
    pgrelay::cli::main()
}
