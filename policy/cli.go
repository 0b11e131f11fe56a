package policy

// Validate loads the policy at path (a file or a directory) and returns every
// problem found, for `sigil policy validate FILE`.
func Validate(path string) error {
	_, err := Load(path)
	return err
}

// HashFile loads the policy at path and returns its hash in hex, for `sigil
// policy hash FILE`.
func HashFile(path string) (string, error) {
	s, err := Load(path)
	if err != nil {
		return "", err
	}
	return s.HashHex(), nil
}
