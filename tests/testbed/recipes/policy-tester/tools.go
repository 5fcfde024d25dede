//go:build tools

// Package recipe pins the test-bed peer built by tests/testbed/install.sh.
package recipe

import (
	_ "github.com/sigstore/policy-controller/cmd/tester"
)
