// Package software is the in-process key provider: Ed25519, ECDSA P-256/P-384
// and RSA 2048/3072/4096 keys generated on first start into the data directory
// (PKCS#8 PEM, mode 0600, directory 0700; files and new directories fsynced,
// a crash's old temp files removed at Open) and loaded on later starts. It is the
// embedded default and the fallback where no HSM or KMS is configured. Key
// material never leaves the process and is never logged.
package software
