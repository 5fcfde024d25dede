//go:build tools

// Package recipe pins the test-bed peer built by tests/testbed/install.sh.
package recipe

import (
	_ "k8s.io/kubernetes/cmd/kubectl"
)
