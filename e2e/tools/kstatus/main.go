// kstatus reads Kubernetes objects as JSON (one object, a JSON array, or a List) on stdin and prints, for
// each, one JSON line with the verdict of the kstatus library that Flux and kpt use to judge health:
// {"kind": ..., "namespace": ..., "name": ..., "status": "InProgress|Current|Failed|...", "message": ...}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

// objects decodes with apimachinery's JSON reader, which keeps whole numbers as int64 the way the
// unstructured accessors (metadata.generation, status.observedGeneration) expect them.
func objects(raw []byte) ([]map[string]any, error) {
	var many []map[string]any
	if err := utiljson.Unmarshal(raw, &many); err == nil {
		return many, nil
	}
	var one map[string]any
	if err := utiljson.Unmarshal(raw, &one); err != nil {
		return nil, fmt.Errorf("stdin is neither a JSON object nor an array of objects: %w", err)
	}
	if items, ok := one["items"].([]any); ok {
		for i, item := range items {
			obj, ok := item.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("items[%d] is not an object", i)
			}
			many = append(many, obj)
		}
		return many, nil
	}
	return []map[string]any{one}, nil
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading stdin:", err)
		os.Exit(2)
	}
	objs, err := objects(raw)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, obj := range objs {
		u := &unstructured.Unstructured{Object: obj}
		result, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %s %s/%s: %v\n", u.GetKind(), u.GetNamespace(), u.GetName(), err)
			os.Exit(1)
		}
		v := verdict{u.GetKind(), u.GetNamespace(), u.GetName(), result.Status.String(), result.Message}
		if err := out.Encode(v); err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: writing stdout:", err)
			os.Exit(2)
		}
	}
}
