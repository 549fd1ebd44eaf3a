//! The SOCKS5 greeting and CONNECT request a client sends, read from memory: any bytes end in a
//! target or an error with its reply code, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// One runtime for every input (building one per input would dominate the run).
static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    });
    rt.block_on(async {
        let mut io = tokio::io::join(data, tokio::io::sink());
        let _ = l4mesh::proxy::socks5::read_request(&mut io).await;
    });
});
