//go:build !linux

package main

// hardenProcess: PR_SET_DUMPABLE is Linux's; elsewhere nothing is done.
func hardenProcess() error { return nil }

func dumpable() (bool, error) { return true, nil }
