using TorchSharp;

namespace AdapterFlow.Tests;

public class TorchSharpLoadsTest
{
    [Fact]
    public void NativeLibraryLoadsAndComputes()
    {
        using var scope = torch.NewDisposeScope();
        var a = torch.tensor(new float[] { 1, 2, 3, 4 }).reshape(2, 2);
        var product = a.matmul(a);
        Assert.Equal(new float[] { 7, 10, 15, 22 }, product.data<float>().ToArray());
    }
}
